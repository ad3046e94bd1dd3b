// The fused CPU kernels behind the ops (inputs already validated and contiguous).
#pragma once

#include <ATen/core/Tensor.h>

#include "options.h"
#include "positives.h"

namespace mlcl_fast {

struct ForwardResult {
  at::Tensor loss;          // [R] rows' dtype, 0 for invalid anchors
  at::Tensor valid;         // [R] bool
  at::Tensor lse;           // [R] float64: log sum_j beta_j exp(s_ij) (0 for invalid anchors)
  at::Tensor total_weight;  // [R] float64: W_i
  at::Tensor normalizer;    // [R, normalizer_width] float64: Z_ik, or the sum of omega
};

ForwardResult forward_cpu(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& self_col,
                          const LabelContext& labels, const LossOptions& opt, int64_t normalizer_width);

// Returns (grad_rows [R, d], grad_cols [C, d]) for the per-anchor loss gradient grad_loss [R].
// `combine_self`: the caller needs only grad_rows[i] + grad_cols[self_col[i]] (row i and its own
// column are one embedding), so that sum may be returned in grad_rows alone (backward.cpp).
std::pair<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_loss, const at::Tensor& rows,
                                               const at::Tensor& cols, const at::Tensor& self_col,
                                               const LabelContext& labels, const LossOptions& opt,
                                               const at::Tensor& lse, const at::Tensor& total_weight,
                                               const at::Tensor& normalizer, bool combine_self = false);

}  // namespace mlcl_fast
