// The blocked algorithm: matrix products from the device's BLAS (cuBLAS through ATen on CUDA,
// tensor cores for fp16/bf16 and tf32 per torch's setting) on bounded blocks of anchors against
// every column, and fused per-block kernels for the label weights, the log-sum-exp, the
// regulariser and the gradient coefficients. The loop is device-agnostic ATen; the per-block
// kernels come from a BlockKernels implementation (CPU: blocked.cpp; CUDA: cuda/ops_cuda.cpp),
// so the CPU runs the very loop the GPU runs (MLCL_FAST_CPU_ALGORITHM=blocked, for tests).
//
// Memory beyond inputs and outputs: O((R + C)(d + K)) plus a workspace of block_rows x C
// entries (the logits, c_ij and sum 1/Z_ik where the weighting needs them, half-precision
// gradient coefficients), capped at MLCL_FAST_BLOCK_WORKSPACE_MB (default 512) MiB but never
// below one anchor row.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "block_math.h"
#include "options.h"

namespace mlcl_fast {

struct BlockKernels {
  virtual ~BlockKernels() = default;
  // Fills the block's counts / inv_z (zeroed by the caller); with `compute_z` (forward) also the
  // label-centric Z_ik of the block's anchors, else reads them from st.normaliser.
  virtual void positives(const mlcl_block::BlockProblem& p, const mlcl_block::AnchorStats& st,
                         const mlcl_block::Block& b, bool compute_z) const = 0;
  // Log-sum-exp, normaliser (pair-centric), W_i, weighted logits, regulariser, loss, validity.
  virtual void row_stats(const mlcl_block::BlockProblem& p, const mlcl_block::AnchorStats& st,
                         const mlcl_block::Block& b) const = 0;
  // G_ij = g_i (W_i p_ij - w_ij - r_ij) / tau into `out` ([b.rows, C] of `kind`); `out` may be the
  // block's logits themselves (fp32: each entry is read before it is written).
  virtual void gradient(const mlcl_block::BlockProblem& p, const mlcl_block::AnchorStats& st,
                        const mlcl_block::Block& b, const float* grad_loss, void* out,
                        mlcl_block::CoefKind kind) const = 0;
};

// Forward: (loss [R] fp32 (fp64 for fp64 rows), valid [R] bool, lse [R], total_weight [R],
// normaliser [R, width], label_prep [blocked_prep_size] int32) with fp32 statistics; label_prep
// is the label preparation (the columns' inverted label index, the label counts, int32 labels)
// for the backward to reuse.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blocked_forward(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const at::Tensor& self_col, const LossOptions& opt, const BlockKernels& kernels);

// Backward from the forward's fp32 statistics: (grad_rows, grad_cols) in the rows' dtype.
// `label_prep`: the forward's (reused), or empty (prepared again).
std::tuple<at::Tensor, at::Tensor> blocked_backward(const at::Tensor& grad_loss, const at::Tensor& rows,
                                                    const at::Tensor& cols, const at::Tensor& row_labels,
                                                    const at::Tensor& col_labels, const at::Tensor& self_col,
                                                    const at::Tensor& lse, const at::Tensor& total_weight,
                                                    const at::Tensor& normaliser, const at::Tensor& label_prep,
                                                    const LossOptions& opt, const BlockKernels& kernels);

// The backward's label_prep argument, checked: absent or empty (an empty tensor is returned), or
// blocked_forward's for these inputs: its shape, dtype and device always; with check_values its
// values too (recomputed and compared: one host read).
at::Tensor checked_label_prep(const std::optional<at::Tensor>& label_prep, const at::Tensor& rows,
                              const at::Tensor& cols, const at::Tensor& row_labels, const at::Tensor& col_labels,
                              const LossOptions& opt, bool check_values);

// The number of int32 entries of blocked_forward's label_prep.
int64_t blocked_prep_size(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                          const at::Tensor& col_labels, int64_t num_labels);

// Anchors per block for C columns at `bytes_per_pair` workspace bytes (>= 1, multiple of 64 from 64 on).
int64_t block_rows(int64_t num_rows, int64_t num_cols, int64_t bytes_per_pair);

// The CPU implementation of the block kernels.
const BlockKernels& cpu_block_kernels();

// MLCL_FAST_CPU_ALGORITHM = fused (default) | blocked, read at every call.
bool cpu_blocked_requested();

}  // namespace mlcl_fast
