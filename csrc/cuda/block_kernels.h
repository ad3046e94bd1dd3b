// CUDA launchers of the blocked algorithm's per-block kernels (csrc/cpu/blocked.h describes the
// algorithm, csrc/cpu/block_math.h the structures and formulas). Plain pointers, no torch
// headers: nvcc compiles block_kernels.cu alone. Every launcher enqueues on `stream` and returns
// the launch error (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include "cpu/block_math.h"

namespace mlcl_block {

// One warp per anchor of the block: c_ij and sum 1/Z_ik by walking the columns of each of the
// anchor's labels (the inverted index), label slots in order; with `compute_z` also Z_ik and W_i.
cudaError_t launch_positives(const BlockProblem& p, const AnchorStats& st, const Block& b, bool compute_z,
                             cudaStream_t stream);

// One thread block per anchor: log-sum-exp, normaliser, weighted logits, regulariser, loss.
cudaError_t launch_row_stats(const BlockProblem& p, const AnchorStats& st, const Block& b, cudaStream_t stream);

// Elementwise G_ij into `out` ([b.rows, num_cols] of `kind`; may alias b.logits for fp32).
cudaError_t launch_gradient(const BlockProblem& p, const AnchorStats& st, const Block& b, const float* grad_loss,
                            void* out, CoefKind kind, cudaStream_t stream);

}  // namespace mlcl_block
