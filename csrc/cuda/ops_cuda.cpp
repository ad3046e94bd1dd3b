// CUDA implementations of the mlcl_fast ops (schemas: csrc/cpu/ops.cpp, documented in
// csrc/README.md): the blocked algorithm of csrc/cpu/blocked.h, whose products are cuBLAS calls
// through ATen, with the per-block kernels of block_kernels.cu on the current CUDA stream. The
// argument checks are the CPU ops' own (csrc/cpu/options.h). Saved statistics are fp32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/blocked.h"
#include "cpu/options.h"
#include "cuda/block_kernels.h"

namespace mlcl_fast {
namespace {

using mlcl_block::AnchorStats;
using mlcl_block::Block;
using mlcl_block::BlockProblem;

void check_cuda_result(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "mlcl_fast CUDA ", kernel, " kernel failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaBlockKernels final : BlockKernels {
  void positives(const BlockProblem& p, const AnchorStats& st, const Block& b, bool compute_z) const override {
    check_cuda_result(mlcl_block::launch_positives(p, st, b, compute_z, current_stream()), "positives");
  }
  void row_stats(const BlockProblem& p, const AnchorStats& st, const Block& b) const override {
    check_cuda_result(mlcl_block::launch_row_stats(p, st, b, current_stream()), "row statistics");
  }
  void gradient(const BlockProblem& p, const AnchorStats& st, const Block& b, const float* grad_loss, void* out,
                mlcl_block::CoefKind kind) const override {
    check_cuda_result(mlcl_block::launch_gradient(p, st, b, grad_loss, out, kind, current_stream()), "gradient");
  }
};

const CudaBlockKernels kKernels;

void check_cuda_device(const at::Tensor& rows) {
  TORCH_CHECK(rows.is_cuda(), "rows: expected a CUDA tensor, got device ", rows.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> anchor_loss_forward_cuda(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const at::Tensor& self_col, int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
    c10::string_view weighting, c10::string_view pair_factor, double alpha, bool reg, bool check_values,
    bool /*combine_self*/) {
  const LossOptions opt = parse_options(num_sample_cols, num_labels, temperature, beta, std::string(weighting),
                                        std::string(pair_factor), alpha, reg);
  check_cuda_device(rows);
  check_inputs(rows, cols, row_labels, col_labels, self_col, opt, check_values, /*half_ok=*/true);
  const c10::cuda::CUDAGuard guard(rows.device());
  return blocked_forward(rows, cols, row_labels, col_labels, self_col, opt, kKernels);
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
    const at::Tensor& col_labels, const at::Tensor& self_col, const at::Tensor& lse, const at::Tensor& total_weight,
    const at::Tensor& normalizer, int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
    c10::string_view weighting, c10::string_view pair_factor, double alpha, bool reg, bool check_values,
    bool /*combine_self: the blocked kernels return both gradients as they are, which is allowed*/,
    const std::optional<at::Tensor>& label_prep) {
  const LossOptions opt = parse_options(num_sample_cols, num_labels, temperature, beta, std::string(weighting),
                                        std::string(pair_factor), alpha, reg);
  check_cuda_device(rows);
  check_inputs(rows, cols, row_labels, col_labels, self_col, opt, check_values, /*half_ok=*/true);
  check_saved(grad_loss, lse, total_weight, normalizer, rows, row_labels, opt, at::kFloat);
  const at::Tensor prep = checked_label_prep(label_prep, rows, cols, row_labels, col_labels, opt, check_values);
  const c10::cuda::CUDAGuard guard(rows.device());
  return blocked_backward(grad_loss, rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer, prep,
                          opt, kKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcl_fast, CUDA, m) {
  m.impl("anchor_loss_forward", &anchor_loss_forward_cuda);
  m.impl("anchor_loss_backward", &anchor_loss_backward_cuda);
}

}  // namespace mlcl_fast
