// Operator schemas (see csrc/README.md) and their CPU kernels.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "blocked.h"
#include "kernels.h"
#include "options.h"
#include "positives.h"

namespace mlcl_fast {

namespace {

using ForwardTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardTuple anchor_loss_forward(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                                 const at::Tensor& col_labels, const at::Tensor& self_col, int64_t num_sample_cols,
                                 int64_t num_labels, double temperature, double beta, c10::string_view weighting,
                                 c10::string_view pair_factor, double alpha, bool reg,
                                 bool check_values, bool /*combine_self: a backward option*/) {
  const LossOptions opt = parse_options(num_sample_cols, num_labels, temperature, beta, std::string(weighting),
                                        std::string(pair_factor), alpha, reg);
  check_inputs(rows, cols, row_labels, col_labels, self_col, opt, check_values);
  if (cpu_blocked_requested()) {  // the CUDA backend's algorithm, on the CPU (tests)
    auto [loss, valid, lse, total_weight, normalizer, label_prep] =
        blocked_forward(rows, cols, row_labels, col_labels, self_col, opt, cpu_block_kernels());
    return {loss, valid, lse.to(at::kDouble), total_weight.to(at::kDouble), normalizer.to(at::kDouble), label_prep};
  }
  const auto r = rows.contiguous();
  const auto c = cols.contiguous();
  const auto self = self_col.contiguous();
  const LabelContext labels = build_label_context(row_labels, col_labels, opt, c.size(0), positives_strategy_from_env());
  ForwardResult out = forward_cpu(r, c, self, labels, opt, normalizer_width(opt, row_labels));
  // The fused algorithm keeps no label preparation for the backward (its positives differ by regime).
  return {out.loss, out.valid, out.lse, out.total_weight, out.normalizer, at::empty({0}, r.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
    const at::Tensor& col_labels, const at::Tensor& self_col, const at::Tensor& lse, const at::Tensor& total_weight,
    const at::Tensor& normalizer, int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
    c10::string_view weighting, c10::string_view pair_factor, double alpha, bool reg, bool check_values,
    bool combine_self, const std::optional<at::Tensor>& label_prep) {
  const LossOptions opt = parse_options(num_sample_cols, num_labels, temperature, beta, std::string(weighting),
                                        std::string(pair_factor), alpha, reg);
  check_inputs(rows, cols, row_labels, col_labels, self_col, opt, check_values);
  check_saved(grad_loss, lse, total_weight, normalizer, rows, row_labels, opt, at::kDouble);
  const at::Tensor prep = checked_label_prep(label_prep, rows, cols, row_labels, col_labels, opt, check_values);
  if (cpu_blocked_requested()) {
    return blocked_backward(grad_loss, rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer,
                            prep, opt, cpu_block_kernels());
  }
  const auto r = rows.contiguous();
  const auto c = cols.contiguous();
  const LabelContext labels = build_label_context(row_labels, col_labels, opt, c.size(0), positives_strategy_from_env());
  auto [grad_rows, grad_cols] = backward_cpu(grad_loss, r, c, self_col.contiguous(), labels, opt, lse.contiguous(),
                                             total_weight.contiguous(), normalizer.contiguous(), combine_self);
  return {grad_rows, grad_cols};
}

}  // namespace

TORCH_LIBRARY(mlcl_fast, m) {
  m.def(
      "anchor_loss_forward(Tensor rows, Tensor cols, Tensor row_labels, Tensor col_labels, Tensor self_col, "
      "int num_sample_cols, int num_labels, float temperature, float beta, str weighting, str pair_factor, "
      "float alpha, bool reg, bool check_values=True, bool combine_self=False) "
      "-> (Tensor loss, Tensor valid, Tensor lse, Tensor total_weight, Tensor normalizer, Tensor label_prep)");
  m.def(
      "anchor_loss_backward(Tensor grad_loss, Tensor rows, Tensor cols, Tensor row_labels, Tensor col_labels, "
      "Tensor self_col, Tensor lse, Tensor total_weight, Tensor normalizer, int num_sample_cols, int num_labels, "
      "float temperature, float beta, str weighting, str pair_factor, float alpha, bool reg, "
      "bool check_values=True, bool combine_self=False, Tensor? label_prep=None) "
      "-> (Tensor grad_rows, Tensor grad_cols)");
  // The columns' inverted label index. Implemented in Python (mlcl_fast/label_index.py, registered
  // by mlcl_fast/backends/native_ops.py): the one implementation, shared with the Triton backend;
  // the blocked algorithm calls it through the dispatcher (blocked.cpp).
  m.def("column_label_index(Tensor col_labels, int num_labels, int col_lo=0, bool check_values=True) "
        "-> (Tensor ptr, Tensor cols)");
}

TORCH_LIBRARY_IMPL(mlcl_fast, CPU, m) {
  m.impl("anchor_loss_forward", &anchor_loss_forward);
  m.impl("anchor_loss_backward", &anchor_loss_backward);
}

}  // namespace mlcl_fast

// `import mlcl_fast._C` loads the library above, which registers the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mlcl_fast CPU operators (torch.ops.mlcl_fast)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
