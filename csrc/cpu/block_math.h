// The blocked algorithm's plain-pointer problem description and its per-pair / per-anchor
// formulas (SPEC), shared by the CPU block kernels (blocked.cpp) and the CUDA ones
// (cuda/block_kernels.cu): plain C++ without nvcc, `__host__ __device__` with it; no torch or
// CUDA headers, so nvcc compiles the CUDA kernels alone.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MLCL_HD __host__ __device__ __forceinline__
#else
#define MLCL_HD inline
#endif

namespace mlcl_block {

// Option codes: positions in mlcl_fast.presets.WEIGHTINGS / PAIR_FACTORS (tests/test_triton.py
// checks that they agree).
enum WeightingKind : int32_t { kWeightAny = 0, kWeightAll = 1, kWeightJaccard = 2, kWeightLabel = 3 };
enum FactorKind : int32_t { kFactorOne = 0, kFactorUnion = 1, kFactorOverlap = 2 };
// dtype of the gradient coefficients G (the inputs' dtype for fp16/bf16, so that their products
// run on the tensor cores).
enum CoefKind : int32_t { kCoefFloat32 = 0, kCoefFloat16 = 1, kCoefBFloat16 = 2 };

// One loss evaluation as the block kernels see it. Anchors are rows [0, num_rows), softmax
// columns [0, num_cols) (samples first: [0, num_sample_cols), then prototypes). Label lists are
// int32, ascending, -1 padded, with their counts; label k is carried by the columns
// label_cols[label_ptr[k] .. label_ptr[k+1]) (ascending).
struct BlockProblem {
  int64_t num_rows;
  int64_t num_cols;
  int64_t num_sample_cols;

  const int32_t* row_labels;  // [num_rows, row_width]
  const int32_t* row_count;   // [num_rows]
  int32_t row_width;
  const int32_t* col_count;   // [num_cols]
  const int64_t* self_col;    // [num_rows] the anchor's own column, never in its softmax
  const int32_t* label_ptr;   // [num_labels + 1]
  const int32_t* label_cols;  // [label_ptr[num_labels]]

  int32_t weighting;  // WeightingKind
  int32_t factor;     // FactorKind (label-centric only)
  float alpha;
  float beta;
  float log_beta_samples;  // log(beta), unused when beta == 0
  float inv_temperature;
  bool reg;
  bool needs_counts;  // pair-centric, or a factor that depends on |y_i ∩ y_j|
};

// Per-anchor fp32 statistics, [num_rows] (normaliser [num_rows, row_width] label-centric, or
// [num_rows] Omega_i pair-centric). The forward writes them; the backward reads them.
struct AnchorStats {
  float* normaliser;    // Z_ik per label slot (label-centric) or Omega_i = sum_j omega_ij
  float* total_weight;  // W_i
  float* lse;           // log D_i (0 for invalid anchors)
  float* loss;          // l_i (forward only)
  uint8_t* valid;       // W_i > 0 (forward only)
};

// One block: anchors [row0, row0 + rows) against every column. `logits` holds the raw products
// <q_i, k_j> ([rows, num_cols], row-major, fp32); `counts` c_ij = |y_i ∩ y_j| (when
// needs_counts) and `inv_z` sum over shared slots of 1 / Z_ik (label-centric) are zeroed by the
// caller and filled by the positives kernel.
struct Block {
  int64_t row0;
  int64_t rows;
  const float* logits;
  float* counts;
  float* inv_z;
};

MLCL_HD bool label_centric(const BlockProblem& p) { return p.weighting == kWeightLabel; }

// Column `col` enters anchor `row`'s softmax: it is not the anchor itself, and its beta is > 0.
MLCL_HD bool in_softmax(const BlockProblem& p, int64_t row, int64_t col) {
  return col != p.self_col[row] && (col >= p.num_sample_cols || p.beta > 0.0f);
}

// The scaled logit x_ij = <q_i, k_j> / tau, plus log beta_j: what enters the log-sum-exp.
MLCL_HD float softmax_logit(const BlockProblem& p, float dot, int64_t col) {
  return dot * p.inv_temperature + (col < p.num_sample_cols ? p.log_beta_samples : 0.0f);
}

// Pair-centric omega_ij (any / all / jaccard) from c = |y_i ∩ y_j|, a_i, a_j.
MLCL_HD float pair_omega(const BlockProblem& p, int32_t c, int32_t ai, int32_t aj) {
  if (c <= 0) return 0.0f;
  switch (p.weighting) {
    case kWeightAny:
      return 1.0f;
    case kWeightAll:
      return (c == ai && c == aj) ? 1.0f : 0.0f;
    default:  // jaccard
      return static_cast<float>(c) / static_cast<float>(ai + aj - c);
  }
}

// Label-centric pair factor f_ij; only ever evaluated on columns sharing a label with the anchor
// (c >= 1; c is not read for the factors that do not need it).
MLCL_HD float pair_factor(const BlockProblem& p, int32_t c, int32_t ai, int32_t aj, bool prototype_col) {
  switch (p.factor) {
    case kFactorOne:
      return 1.0f;
    case kFactorUnion: {
      if (prototype_col) return 1.0f;
      const int32_t uni = ai + aj - c;
      return 1.0f / static_cast<float>(uni > 1 ? uni : 1);
    }
    default:  // overlap: (c/a_j)^alpha; alpha < 0 is the hard threshold y_j ⊆ y_i
      if (p.alpha < 0.0f) return c == aj ? 1.0f : 0.0f;
      if (p.alpha == 0.0f) return 1.0f;
      return powf(static_cast<float>(c) / static_cast<float>(aj > 1 ? aj : 1), p.alpha);
  }
}

// The factor of a column carrying one of the anchor's labels, from the block's count buffer.
MLCL_HD float block_factor(const BlockProblem& p, const Block& b, int64_t i, int64_t col) {
  if (!p.needs_counts) return 1.0f;
  const int32_t c = static_cast<int32_t>(b.counts[i * p.num_cols + col]);
  return pair_factor(p, c, p.row_count[b.row0 + i], p.col_count[col], col >= p.num_sample_cols);
}

// Label-centric w_ij = f_ij / a_i * sum_{k in y_i ∩ y_j, Z_ik > 0} 1 / Z_ik, for a column in the
// softmax; 0 on columns that share no label (inv_z = 0 there).
MLCL_HD float label_weight(const BlockProblem& p, const Block& b, int64_t i, int64_t col) {
  const float inv_z = b.inv_z[i * p.num_cols + col];
  if (inv_z == 0.0f) return 0.0f;
  return block_factor(p, b, i, col) * inv_z / static_cast<float>(p.row_count[b.row0 + i]);
}

// Pair-centric omega_ij for a column in the softmax.
MLCL_HD float block_omega(const BlockProblem& p, const Block& b, int64_t i, int64_t col) {
  const int32_t c = static_cast<int32_t>(b.counts[i * p.num_cols + col]);
  return pair_omega(p, c, p.row_count[b.row0 + i], p.col_count[col]);
}

// w_ij for a column in anchor i's softmax, once the normaliser is known.
MLCL_HD float block_weight(const BlockProblem& p, const AnchorStats& st, const Block& b, int64_t i, int64_t col) {
  if (label_centric(p)) return label_weight(p, b, i, col);
  const float omega = st.normaliser[b.row0 + i];
  return omega > 0.0f ? block_omega(p, b, i, col) / omega : 0.0f;
}

// The regulariser's stop-gradient r_ij = max(p_ij - w_ij, 0) on positives.
MLCL_HD float reg_term(const BlockProblem& p, float prob, float w) {
  return (p.reg && w > 0.0f) ? fmaxf(prob - w, 0.0f) : 0.0f;
}

// Label-centric W_i: the share of the anchor's label slots with Z_ik > 0.
MLCL_HD float label_total_weight(const BlockProblem& p, const float* z, int64_t row) {
  const int32_t ai = p.row_count[row];
  int32_t live = 0;
  for (int32_t t = 0; t < ai; ++t) live += z[row * p.row_width + t] > 0.0f;
  return ai > 0 ? static_cast<float>(live) / static_cast<float>(ai) : 0.0f;
}

// dl/d<q_i, k_j> scaled by g_i: g_i (W_i p_ij - w_ij - r_ij) / tau; 0 outside the softmax and for
// invalid anchors (their loss is the constant 0).
MLCL_HD float pair_grad(const BlockProblem& p, const AnchorStats& st, const Block& b, const float* grad_loss,
                        int64_t i, int64_t col) {
  const int64_t row = b.row0 + i;
  const float W = st.total_weight[row];
  if (W == 0.0f || !in_softmax(p, row, col)) return 0.0f;
  const float w = block_weight(p, st, b, i, col);
  const float prob = expf(softmax_logit(p, b.logits[i * p.num_cols + col], col) - st.lse[row]);
  return grad_loss[row] * (W * prob - w - reg_term(p, prob, w)) * p.inv_temperature;
}

// l_i = W_i log D_i - sum_j w_ij x_ij - sum_j r_ij x_ij for valid anchors (x_ij = <q_i,k_j>/tau);
// an invalid anchor gets loss 0 and log D_i := 0 (its softmax may be empty).
MLCL_HD void finish_anchor(const AnchorStats& st, int64_t row, float lse, float weighted, float regulariser) {
  const float W = st.total_weight[row];
  const bool ok = W > 0.0f;
  st.loss[row] = ok ? W * lse - weighted - regulariser : 0.0f;
  st.valid[row] = ok ? 1 : 0;
  st.lse[row] = ok ? lse : 0.0f;
}

}  // namespace mlcl_block
