// Loss configuration as the ops receive it, validated once at the top of each op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace mlcl_fast {

enum class Weighting { Any, All, Jaccard, Label };
enum class PairFactor { One, Union, Overlap };

struct LossOptions {
  Weighting weighting = Weighting::Any;
  PairFactor factor = PairFactor::One;
  double alpha = 0.0;
  double beta = 1.0;
  double temperature = 0.1;
  bool reg = false;
  int64_t num_sample_cols = 0;  // columns [0, num_sample_cols) are samples, the rest prototypes
  int64_t num_labels = 0;

  bool label_centric() const { return weighting == Weighting::Label; }
  // f is 1 on every column that shares a label with the anchor, so Z_ik is a column count.
  bool unit_factor() const {
    return factor == PairFactor::One || (factor == PairFactor::Overlap && alpha == 0.0);
  }
  // beta = 0 drops the sample columns from the softmax (and so from the positives).
  int64_t first_column() const { return beta == 0.0 ? num_sample_cols : 0; }
};

LossOptions parse_options(int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
                          const std::string& weighting, const std::string& pair_factor, double alpha, bool reg);

// Shape, dtype, device and value checks shared by every op on every device; each names its
// argument. Value checks (label ids, their canonical order, self_col) with `check_values`: CPU
// tensors are scanned (the message names the bad row); on other devices the violations are
// counted there and read back with one copy (a host synchronisation). Without `check_values` the
// same checks are device-side assertions (assert_values_on_device): no host synchronisation.
// `half_ok`: fp16/bf16 rows are accepted.
void check_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                  const at::Tensor& col_labels, const at::Tensor& self_col, const LossOptions& opt,
                  bool check_values, bool half_ok = false);

// The value checks of check_inputs for tensors off the CPU: counted with ATen ops on their
// device, then one device-to-host copy. Works on CPU tensors too (tests).
void check_values_by_count(const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& self_col,
                           int64_t num_cols, const LossOptions& opt);

// The value checks as assertions on the tensors' device (at::_assert_async), read by no host code:
// on the CPU a violation raises at once; on CUDA it fails the stream with the message, which names
// the argument. What the public API uses (its labels are validated or asserted when canonicalised).
void assert_values_on_device(const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& self_col,
                             int64_t num_cols, const LossOptions& opt);

// The backward's extra inputs: grad_loss [R] (floating point) and the forward's saved statistics
// lse, total_weight [R] and normalizer [R, normalizer_width] in `stats_dtype`, all on rows' device.
void check_saved(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& total_weight,
                 const at::Tensor& normalizer, const at::Tensor& rows, const at::Tensor& row_labels,
                 const LossOptions& opt, at::ScalarType stats_dtype);

// Columns of the per-anchor normaliser: Z_ik per label slot (label-centric) or one sum of omega.
inline int64_t normalizer_width(const LossOptions& opt, const at::Tensor& row_labels) {
  return opt.label_centric() ? row_labels.size(1) : 1;
}

}  // namespace mlcl_fast
