// Per-pair and per-anchor formulas of SPEC, shared by the CUDA kernels and the host model
// (csrc/cuda/testing/host_model.cpp), so the model checks the very code the kernels execute.
// Plain C++ when compiled without nvcc: no CUDA or torch headers.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.h"

#ifdef __CUDACC__
#define MLCL_HD __host__ __device__ __forceinline__
#else
#define MLCL_HD inline
#endif

namespace mlcl_cuda {

MLCL_HD const int32_t* row_label_list(const LossProblem& p, int64_t row) { return p.row_labels + row * p.row_width; }
MLCL_HD const int32_t* col_label_list(const LossProblem& p, int64_t col) { return p.col_labels + col * p.col_width; }

// Column `col` enters anchor `row`'s softmax: it is not the anchor itself, and its beta is > 0.
MLCL_HD bool in_softmax(const LossProblem& p, int64_t row, int64_t col) {
  return col != p.self_col[row] && (col >= p.num_sample_cols || p.beta > 0.0f);
}

MLCL_HD float log_beta(const LossProblem& p, int64_t col) {
  return col < p.num_sample_cols ? p.log_beta_samples : 0.0f;
}

// c = |y_i ∩ y_j| by merging the two sorted lists. When `z` is given (the anchor's Z_ik per label
// slot) `inv_z_sum` collects 1/Z_ik over the shared slots (skipping Z_ik = 0); `first_slot` is the
// anchor's slot of the smallest shared label (-1 when none), which lets an inverted-index sweep
// count a column once.
struct Overlap {
  int32_t count;
  int32_t first_slot;
  float inv_z_sum;
};

MLCL_HD Overlap merge_labels(const int32_t* a, int32_t na, const int32_t* b, int32_t nb, const float* z) {
  Overlap o{0, -1, 0.0f};
  int32_t x = 0, y = 0;
  while (x < na && y < nb) {
    const int32_t u = a[x], v = b[y];
    if (u == v) {
      if (o.count == 0) o.first_slot = x;
      ++o.count;
      if (z != nullptr && z[x] > 0.0f) o.inv_z_sum += 1.0f / z[x];
      ++x;
      ++y;
    } else if (u < v) {
      ++x;
    } else {
      ++y;
    }
  }
  return o;
}

// Pair-centric omega_ij (any / all / jaccard) from c = |y_i ∩ y_j|, a_i, a_j.
MLCL_HD float pair_omega(const LossProblem& p, int32_t c, int32_t ai, int32_t aj) {
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

// Label-centric pair factor f_ij; only ever evaluated on columns sharing a label with the anchor.
MLCL_HD float pair_factor(const LossProblem& p, int32_t c, int32_t ai, int32_t aj, bool prototype_col) {
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
      if (c <= 0) return 0.0f;
      if (p.alpha == 0.0f) return 1.0f;
      return powf(static_cast<float>(c) / static_cast<float>(aj > 1 ? aj : 1), p.alpha);
  }
}

// What column `col` (one of those carrying the anchor's `slot`-th label) adds to that slot's sum:
// f_ij for label-centric Z_ik; omega_ij for pair-centric, counted only at the first shared slot so
// the per-slot partial sums add up to Omega_i with every column counted once.
MLCL_HD float slot_term(const LossProblem& p, int64_t row, int32_t slot, int64_t col) {
  if (!in_softmax(p, row, col)) return 0.0f;
  const int32_t ai = p.row_count[row], aj = p.col_count[col];
  const Overlap o = merge_labels(row_label_list(p, row), ai, col_label_list(p, col), aj, nullptr);
  if (p.weighting == kWeightLabel) return pair_factor(p, o.count, ai, aj, col >= p.num_sample_cols);
  return o.first_slot == slot ? pair_omega(p, o.count, ai, aj) : 0.0f;
}

// After the per-slot sums of one anchor: pair-centric sums collapse into Omega_i, and
// W_i = sum_j w_ij exactly (the share of label slots with Z_ik > 0, or 1 when Omega_i > 0).
MLCL_HD void finish_normaliser(const LossProblem& p, const AnchorState& st, int64_t row) {
  const int32_t ai = p.row_count[row];
  const float* slots = st.slot + row * p.row_width;
  if (p.weighting == kWeightLabel) {
    int32_t live = 0;
    for (int32_t t = 0; t < ai; ++t) live += slots[t] > 0.0f;
    st.total_weight[row] = ai > 0 ? static_cast<float>(live) / static_cast<float>(ai) : 0.0f;
  } else {
    float omega = 0.0f;
    for (int32_t t = 0; t < ai; ++t) omega += slots[t];
    st.omega[row] = omega;
    st.total_weight[row] = omega > 0.0f ? 1.0f : 0.0f;
  }
}

// w_ij for a column inside the anchor's softmax (finish_normaliser must have run).
MLCL_HD float pair_weight(const LossProblem& p, const AnchorState& st, int64_t row, int64_t col) {
  const int32_t ai = p.row_count[row], aj = p.col_count[col];
  const bool label = p.weighting == kWeightLabel;
  const Overlap o = merge_labels(row_label_list(p, row), ai, col_label_list(p, col), aj,
                                 label ? st.slot + row * p.row_width : nullptr);
  if (o.count == 0) return 0.0f;
  if (!label) {
    const float omega = st.omega[row];
    return omega > 0.0f ? pair_omega(p, o.count, ai, aj) / omega : 0.0f;
  }
  return pair_factor(p, o.count, ai, aj, col >= p.num_sample_cols) * o.inv_z_sum / static_cast<float>(ai);
}

// The regulariser's stop-gradient r_ij = max(p_ij - w_ij, 0) on positives.
MLCL_HD float reg_term(const LossProblem& p, float prob, float w) {
  return (p.reg && w > 0.0f) ? fmaxf(prob - w, 0.0f) : 0.0f;
}

// d(sum_i g_i l_i)/d<x_i, x_j> = g_i (W_i p_ij - w_ij - r_ij) / tau; 0 outside the softmax and
// for invalid anchors (their loss is the constant 0). `s` is the logit s_ij.
MLCL_HD float pair_grad(const LossProblem& p, const AnchorState& st, const float* grad_loss, int64_t row,
                        int64_t col, float s) {
  const float W = st.total_weight[row];
  if (W == 0.0f || !in_softmax(p, row, col)) return 0.0f;
  const float w = pair_weight(p, st, row, col);
  const float prob = expf(s + log_beta(p, col) - st.log_denom[row]);
  return grad_loss[row] * (W * prob - w - reg_term(p, prob, w)) * p.inv_temperature;
}

// l_i = W_i log D_i - sum_j w_ij s_ij - sum_j r_ij s_ij for valid anchors; an invalid anchor gets
// loss 0 and log D_i := 0 (its softmax may be empty; the backward never reads it).
MLCL_HD void finish_anchor(const AnchorState& st, int64_t row, float* loss, uint8_t* valid) {
  const float W = st.total_weight[row];
  const bool ok = W > 0.0f;
  loss[row] = ok ? W * st.log_denom[row] - st.weighted_logit[row] - st.reg_logit[row] : 0.0f;
  valid[row] = ok ? 1 : 0;
  if (!ok) st.log_denom[row] = 0.0f;
}

}  // namespace mlcl_cuda
