// Sequential host model of the CUDA passes, for tests on machines without a GPU.
//
// It runs the formulas of pair_math.cuh (the code the kernels execute per pair and per anchor)
// in plain loops, with the same pass structure: label-only normaliser over an inverted index,
// log-denominator and weighted logits, regulariser, per-anchor loss, then both gradients. What it
// cannot check is the kernels' scheduling: tiles, shared memory, shuffles and barriers.
// Build: g++ -std=c++17 -O2 -shared -fPIC -DMLCL_CUDA_NO_RUNTIME -I csrc/cuda host_model.cpp
#define MLCL_CUDA_NO_RUNTIME 1
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "pair_math.cuh"

namespace {

using mlcl_cuda::AnchorState;
using mlcl_cuda::LossProblem;

float dot(const LossProblem& p, int64_t row, int64_t col) {
  const float* a = static_cast<const float*>(p.rows) + row * p.dim;
  const float* b = static_cast<const float*>(p.cols) + col * p.dim;
  float s = 0.0f;
  for (int64_t k = 0; k < p.dim; ++k) s += a[k] * b[k];
  return s * p.inv_temperature;
}

}  // namespace

extern "C" {

// Inputs as in kernels.h (fp32 embeddings); outputs: loss/valid [num_rows], log_denom [num_rows],
// grad_rows [num_rows, dim], grad_cols [num_cols, dim] of sum_i grad_loss[i] * l_i.
int mlcl_host_model(const float* rows, const float* cols, int64_t num_rows, int64_t num_cols, int64_t num_sample_cols,
                    int64_t dim, const int32_t* row_labels, const int32_t* row_count, int32_t row_width,
                    const int32_t* col_labels, const int32_t* col_count, int32_t col_width, const int64_t* self_col,
                    int64_t num_labels, int32_t weighting, int32_t factor, float alpha, float beta, float temperature,
                    int32_t reg, const float* grad_loss, float* loss, uint8_t* valid, float* log_denom,
                    float* grad_rows, float* grad_cols) {
  // Inverted index: columns carrying each label, ascending (the launcher builds the same).
  std::vector<int32_t> label_ptr(num_labels + 1, 0), label_cols;
  for (int64_t c = 0; c < num_cols; ++c)
    for (int32_t t = 0; t < col_count[c]; ++t) ++label_ptr[col_labels[c * col_width + t] + 1];
  for (int64_t k = 0; k < num_labels; ++k) label_ptr[k + 1] += label_ptr[k];
  label_cols.resize(label_ptr[num_labels]);
  std::vector<int32_t> fill(label_ptr.begin(), label_ptr.end() - 1);
  for (int64_t c = 0; c < num_cols; ++c)
    for (int32_t t = 0; t < col_count[c]; ++t) label_cols[fill[col_labels[c * col_width + t]]++] = static_cast<int32_t>(c);

  LossProblem p{};
  p.rows = rows;
  p.cols = cols;
  p.dtype = mlcl_cuda::kFloat32;
  p.num_rows = num_rows;
  p.num_cols = num_cols;
  p.num_sample_cols = num_sample_cols;
  p.dim = dim;
  p.row_labels = row_labels;
  p.row_count = row_count;
  p.row_width = row_width;
  p.col_labels = col_labels;
  p.col_count = col_count;
  p.col_width = col_width;
  p.self_col = self_col;
  p.label_ptr = label_ptr.data();
  p.label_cols = label_cols.data();
  p.num_labels = num_labels;
  p.weighting = weighting;
  p.factor = factor;
  p.alpha = alpha;
  p.beta = beta;
  p.log_beta_samples = beta > 0.0f ? std::log(beta) : 0.0f;
  p.inv_temperature = 1.0f / temperature;
  p.reg = reg != 0;

  std::vector<float> slot(num_rows * row_width), omega(num_rows), total_weight(num_rows), weighted(num_rows),
      reg_logit(num_rows);
  const AnchorState st{slot.data(), omega.data(), total_weight.data(), log_denom, weighted.data(), reg_logit.data()};

  for (int64_t i = 0; i < num_rows; ++i) {
    for (int32_t t = 0; t < row_width; ++t) {
      float sum = 0.0f;
      if (t < row_count[i]) {
        const int32_t k = mlcl_cuda::row_label_list(p, i)[t];
        for (int32_t q = label_ptr[k]; q < label_ptr[k + 1]; ++q) sum += mlcl_cuda::slot_term(p, i, t, label_cols[q]);
      }
      slot[i * row_width + t] = sum;
    }
    mlcl_cuda::finish_normaliser(p, st, i);
  }

  for (int64_t i = 0; i < num_rows; ++i) {
    float m = -std::numeric_limits<float>::infinity(), sum = 0.0f, ws = 0.0f;
    for (int64_t j = 0; j < num_cols; ++j)
      if (mlcl_cuda::in_softmax(p, i, j)) m = std::fmax(m, dot(p, i, j) + mlcl_cuda::log_beta(p, j));
    for (int64_t j = 0; j < num_cols; ++j) {
      if (!mlcl_cuda::in_softmax(p, i, j)) continue;
      const float s = dot(p, i, j);
      sum += std::exp(s + mlcl_cuda::log_beta(p, j) - m);
      if (total_weight[i] > 0.0f) ws += mlcl_cuda::pair_weight(p, st, i, j) * s;
    }
    log_denom[i] = sum > 0.0f ? m + std::log(sum) : -std::numeric_limits<float>::infinity();
    weighted[i] = ws;
    float rs = 0.0f;
    if (p.reg && total_weight[i] > 0.0f) {
      for (int64_t j = 0; j < num_cols; ++j) {
        if (!mlcl_cuda::in_softmax(p, i, j)) continue;
        const float w = mlcl_cuda::pair_weight(p, st, i, j);
        const float s = dot(p, i, j);
        if (w > 0.0f) rs += mlcl_cuda::reg_term(p, std::exp(s + mlcl_cuda::log_beta(p, j) - log_denom[i]), w) * s;
      }
    }
    reg_logit[i] = rs;
    mlcl_cuda::finish_anchor(st, i, loss, valid);
  }

  for (int64_t k = 0; k < num_rows * dim; ++k) grad_rows[k] = 0.0f;
  for (int64_t k = 0; k < num_cols * dim; ++k) grad_cols[k] = 0.0f;
  for (int64_t i = 0; i < num_rows; ++i) {
    for (int64_t j = 0; j < num_cols; ++j) {
      const float g = mlcl_cuda::pair_grad(p, st, grad_loss, i, j, dot(p, i, j));
      if (g == 0.0f) continue;
      for (int64_t k = 0; k < dim; ++k) {
        grad_rows[i * dim + k] += g * cols[j * dim + k];
        grad_cols[j * dim + k] += g * rows[i * dim + k];
      }
    }
  }
  return 0;
}

}  // extern "C"
