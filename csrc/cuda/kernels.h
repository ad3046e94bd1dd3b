// CUDA kernels of the loss on plain device pointers: no torch headers, so nvcc compiles
// kernels.cu alone (tests/test_cuda_compile.py). ops_cuda.cpp binds them to tensors.
//
// Anchors ("rows") and columns are given as separate row-major [*, dim] matrices of one dtype.
// Label lists are int32, sorted ascending, -1 padded, with their counts. Columns
// [0, num_sample_cols) are samples (beta applies), the rest are prototypes.
#pragma once

#include <cstdint>

#ifndef MLCL_CUDA_NO_RUNTIME
#include <cuda_runtime_api.h>
#endif

namespace mlcl_cuda {

enum ScalarKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum WeightingKind : int32_t { kWeightAny = 0, kWeightAll = 1, kWeightJaccard = 2, kWeightLabel = 3 };
enum FactorKind : int32_t { kFactorOne = 0, kFactorUnion = 1, kFactorOverlap = 2 };

struct LossProblem {
  const void* rows;  // [num_rows, dim] anchor embeddings
  const void* cols;  // [num_cols, dim] column embeddings
  int32_t dtype;     // ScalarKind of rows and cols; accumulation is fp32 for every dtype
  int64_t num_rows;
  int64_t num_cols;
  int64_t num_sample_cols;
  int64_t dim;

  const int32_t* row_labels;  // [num_rows, row_width]
  const int32_t* row_count;   // [num_rows]
  int32_t row_width;
  const int32_t* col_labels;  // [num_cols, col_width]
  const int32_t* col_count;   // [num_cols]
  int32_t col_width;
  const int64_t* self_col;  // [num_rows] the anchor's own column, never in its softmax

  // Inverted index of the columns: label k is carried by columns
  // label_cols[label_ptr[k] .. label_ptr[k+1]), ascending.
  const int32_t* label_ptr;  // [num_labels + 1]
  const int32_t* label_cols;
  int64_t num_labels;

  int32_t weighting;  // WeightingKind
  int32_t factor;     // FactorKind (label-centric only)
  float alpha;
  float beta;
  float log_beta_samples;  // log(beta), unused when beta == 0
  float inv_temperature;
  bool reg;
};

// Per-anchor fp32 device buffers, owned by the caller. Memory O(num_rows * row_width).
// slot, omega and total_weight depend on the labels only; the op saves them with log_denom for
// the backward pass.
struct AnchorState {
  float* slot;            // [num_rows, row_width] Z_ik (label-centric); per-slot parts of Omega_i otherwise
  float* omega;           // [num_rows] Omega_i = sum_j omega_ij (pair-centric)
  float* total_weight;    // [num_rows] W_i
  float* log_denom;       // [num_rows] log D_i; 0 for invalid anchors once the loss is written
  float* weighted_logit;  // [num_rows] sum_j w_ij s_ij
  float* reg_logit;       // [num_rows] sum_j r_ij s_ij (0 without reg)
};

#ifndef MLCL_CUDA_NO_RUNTIME
// Every launcher enqueues on `stream` and returns the first launch error (cudaSuccess otherwise).

// Z_ik / Omega_i from the labels alone: fills slot, omega, total_weight.
cudaError_t launch_normaliser(const LossProblem& p, const AnchorState& st, cudaStream_t stream);

// Online log-sum-exp and sum_j w_ij s_ij over the column tiles: fills log_denom, weighted_logit.
cudaError_t launch_log_denominator(const LossProblem& p, const AnchorState& st, cudaStream_t stream);

// sum_j r_ij s_ij (needs log_denom; zero without reg), then l_i and validity per anchor.
cudaError_t launch_anchor_loss(const LossProblem& p, const AnchorState& st, float* loss, uint8_t* valid,
                               cudaStream_t stream);

// Gradients of sum_i grad_loss[i] * l_i with respect to the rows and the columns, fp32,
// overwritten: grad_rows [num_rows, dim], grad_cols [num_cols, dim]. Reads slot (label-centric),
// omega (pair-centric), total_weight and log_denom, and writes no AnchorState field.
// Deterministic: each block owns its output rows.
cudaError_t launch_gradients(const LossProblem& p, const AnchorState& st, const float* grad_loss, float* grad_rows,
                             float* grad_cols, cudaStream_t stream);
#endif

}  // namespace mlcl_cuda
