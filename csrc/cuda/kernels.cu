// Tiled CUDA kernels of the loss (see kernels.h for the interface, README.md for the passes).
//
// One sweep kernel serves the three embedding passes. A block owns a tile of 32 "own" entities
// (anchors, or columns for the column gradient) and walks over tiles of 32 "other" entities;
// logits come from shared-memory chunks of both tiles, accumulated in fp32. Warp w holds tile
// rows w, w+8, w+16, w+24 and lane l the l-th other entity, so every per-anchor reduction is a
// warp shuffle tree: fixed order, no atomics, bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"
#include "pair_math.cuh"

namespace mlcl_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kTile = 32;  // entities per tile side: one lane per other entity
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr int kRowsPerWarp = kTile / kWarps;
constexpr int kChunk = 32;  // feature dimensions staged in shared memory at a time

enum Sweep { kSweepLogDenom, kSweepRegulariser, kSweepGradRows, kSweepGradCols };

__device__ __forceinline__ float load_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_float(const double* p, int64_t i) { return static_cast<float>(p[i]); }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// Butterfly reductions: every lane ends with the same, bitwise identical value.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Copies dimensions [d0, d0 + kChunk) of the rows `ids` (-1: absent, reads as zeros) into `tile`.
template <typename T>
__device__ __forceinline__ void stage_chunk(float (*tile)[kChunk + 1], const T* base, const int64_t* ids,
                                            int64_t dim, int64_t d0) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, k = e % kChunk;
    const int64_t id = ids[r];
    tile[r][k] = (id >= 0 && d0 + k < dim) ? load_float(base, id * dim + d0 + k) : 0.0f;
  }
}

// Label-only pass: one warp per (anchor, label slot) walks the columns carrying that label.
__global__ void slot_sum_kernel(LossProblem p, AnchorState st) {
  const int64_t task = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (task >= p.num_rows * p.row_width) return;  // whole warps leave together
  const int64_t row = task / p.row_width;
  const int32_t slot = static_cast<int32_t>(task % p.row_width);
  float sum = 0.0f;
  if (slot < p.row_count[row]) {
    const int32_t label = row_label_list(p, row)[slot];
    const int32_t end = p.label_ptr[label + 1];
    for (int32_t q = p.label_ptr[label] + lane; q < end; q += kWarp) sum += slot_term(p, row, slot, p.label_cols[q]);
  }
  sum = warp_sum(sum);
  if (lane == 0) st.slot[task] = sum;
}

__global__ void finish_normaliser_kernel(LossProblem p, AnchorState st) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < p.num_rows) finish_normaliser(p, st, row);
}

__global__ void finish_anchor_kernel(LossProblem p, AnchorState st, float* loss, uint8_t* valid) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < p.num_rows) finish_anchor(st, row, loss, valid);
}

// Lane 0 of each warp stores the per-anchor results of its tile rows.
template <int SWEEP>
__device__ __forceinline__ void write_row_sums(const AnchorState& st, int64_t first, int64_t count,
                                               const float* run_max, const float* run_sum, const float* acc) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t own = first + r * kWarps;
    if (own >= count) continue;
    if (SWEEP == kSweepLogDenom) {
      st.log_denom[own] = run_sum[r] > 0.0f ? run_max[r] + logf(run_sum[r]) : -INFINITY;
      st.weighted_logit[own] = acc[r];
    } else {
      st.reg_logit[own] = acc[r];
    }
  }
}

template <typename T, int SWEEP>
__global__ void __launch_bounds__(kThreads)
    sweep_kernel(LossProblem p, AnchorState st, const float* grad_loss, float* grad_out) {
  constexpr bool kOwnRows = SWEEP != kSweepGradCols;
  constexpr bool kGrad = SWEEP == kSweepGradRows || SWEEP == kSweepGradCols;
  __shared__ float own_tile[kTile][kChunk + 1];
  __shared__ float other_tile[kTile][kChunk + 1];
  __shared__ float grad_tile[kTile][kTile + 1];
  __shared__ int64_t own_ids[kTile];
  __shared__ int64_t other_ids[kTile];

  const T* own_base = static_cast<const T*>(kOwnRows ? p.rows : p.cols);
  const T* other_base = static_cast<const T*>(kOwnRows ? p.cols : p.rows);
  const int64_t own_count = kOwnRows ? p.num_rows : p.num_cols;
  const int64_t other_count = kOwnRows ? p.num_cols : p.num_rows;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kTile;

  // With beta = 0 no sample column is in any softmax: row sweeps skip them, and a block of
  // sample columns keeps the zero gradient the launcher wrote.
  int64_t other_begin = 0;
  if (p.beta == 0.0f) {
    if (kOwnRows) other_begin = p.num_sample_cols;
    else if (own0 + kTile <= p.num_sample_cols) return;
  }
  if (threadIdx.x < kTile) own_ids[threadIdx.x] = own0 + threadIdx.x < own_count ? own0 + threadIdx.x : -1;

  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    run_max[r] = -INFINITY;
    run_sum[r] = 0.0f;
    acc[r] = 0.0f;
  }

  for (int64_t other0 = other_begin; other0 < other_count; other0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    if (threadIdx.x < kTile) other_ids[threadIdx.x] = other0 + threadIdx.x < other_count ? other0 + threadIdx.x : -1;

    float dot[kRowsPerWarp] = {};
    for (int64_t d0 = 0; d0 < p.dim; d0 += kChunk) {
      __syncthreads();
      stage_chunk(own_tile, own_base, own_ids, p.dim, d0);
      stage_chunk(other_tile, other_base, other_ids, p.dim, d0);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        const float o = other_tile[lane][k];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) dot[r] += own_tile[warp + r * kWarps][k] * o;
      }
    }

    bool any_grad = false;
    const int64_t other = other0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t own = own0 + warp + r * kWarps;
      const bool live = own < own_count && other < other_count;
      const int64_t row = kOwnRows ? own : other;
      const int64_t col = kOwnRows ? other : own;
      const float s = dot[r] * p.inv_temperature;
      if (SWEEP == kSweepLogDenom) {
        const bool in = live && in_softmax(p, row, col);
        const float v = in ? s + log_beta(p, col) : -INFINITY;
        const float tile_max = warp_max(v);
        if (tile_max > -INFINITY) {  // warp-uniform: some column of this tile is in the softmax
          const float m = fmaxf(run_max[r], tile_max);
          const float e = in ? expf(v - m) : 0.0f;
          run_sum[r] = run_sum[r] * expf(run_max[r] - m) + warp_sum(e);
          run_max[r] = m;
        }
        const float ws = (in && st.total_weight[row] > 0.0f) ? pair_weight(p, st, row, col) * s : 0.0f;
        acc[r] += warp_sum(ws);
      } else if (SWEEP == kSweepRegulariser) {
        float rs = 0.0f;
        if (live && in_softmax(p, row, col) && st.total_weight[row] > 0.0f) {
          const float w = pair_weight(p, st, row, col);
          if (w > 0.0f) rs = reg_term(p, expf(s + log_beta(p, col) - st.log_denom[row]), w) * s;
        }
        acc[r] += warp_sum(rs);
      } else {
        const float g = live ? pair_grad(p, st, grad_loss, row, col, s) : 0.0f;
        grad_tile[warp + r * kWarps][lane] = g;
        any_grad = any_grad || g != 0.0f;
      }
    }

    if (kGrad) {
      // grad_out[own] += sum over this tile's others of G(own, other) * x_other
      if (!__syncthreads_or(any_grad)) continue;
      for (int64_t d0 = 0; d0 < p.dim; d0 += kChunk) {
        __syncthreads();
        stage_chunk(other_tile, other_base, other_ids, p.dim, d0);
        __syncthreads();
        float part[kRowsPerWarp] = {};
#pragma unroll 8
        for (int k = 0; k < kTile; ++k) {
          const float o = other_tile[k][lane];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) part[r] += grad_tile[warp + r * kWarps][k] * o;
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int64_t own = own0 + warp + r * kWarps;
          if (own < own_count && d0 + lane < p.dim) grad_out[own * p.dim + d0 + lane] += part[r];
        }
      }
    }
  }

  if (kGrad || lane != 0) return;
  write_row_sums<SWEEP>(st, own0 + warp, own_count, run_max, run_sum, acc);
}

template <int SWEEP>
cudaError_t launch_sweep(const LossProblem& p, const AnchorState& st, const float* grad_loss, float* grad_out,
                         cudaStream_t stream) {
  const int64_t own = SWEEP == kSweepGradCols ? p.num_cols : p.num_rows;
  if (own == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((own + kTile - 1) / kTile));
  switch (p.dtype) {
    case kFloat32:
      sweep_kernel<float, SWEEP><<<grid, kThreads, 0, stream>>>(p, st, grad_loss, grad_out);
      break;
    case kFloat16:
      sweep_kernel<__half, SWEEP><<<grid, kThreads, 0, stream>>>(p, st, grad_loss, grad_out);
      break;
    case kBFloat16:
      sweep_kernel<__nv_bfloat16, SWEEP><<<grid, kThreads, 0, stream>>>(p, st, grad_loss, grad_out);
      break;
    case kFloat64:
      sweep_kernel<double, SWEEP><<<grid, kThreads, 0, stream>>>(p, st, grad_loss, grad_out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

unsigned blocks_for(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_normaliser(const LossProblem& p, const AnchorState& st, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  const int64_t tasks = p.num_rows * p.row_width;
  if (tasks > 0) {
    slot_sum_kernel<<<blocks_for(tasks * kWarp), kThreads, 0, stream>>>(p, st);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  finish_normaliser_kernel<<<blocks_for(p.num_rows), kThreads, 0, stream>>>(p, st);
  return cudaGetLastError();
}

cudaError_t launch_log_denominator(const LossProblem& p, const AnchorState& st, cudaStream_t stream) {
  return launch_sweep<kSweepLogDenom>(p, st, nullptr, nullptr, stream);
}

cudaError_t launch_anchor_loss(const LossProblem& p, const AnchorState& st, float* loss, uint8_t* valid,
                               cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  cudaError_t err = p.reg ? launch_sweep<kSweepRegulariser>(p, st, nullptr, nullptr, stream)
                          : cudaMemsetAsync(st.reg_logit, 0, sizeof(float) * p.num_rows, stream);
  if (err != cudaSuccess) return err;
  finish_anchor_kernel<<<blocks_for(p.num_rows), kThreads, 0, stream>>>(p, st, loss, valid);
  return cudaGetLastError();
}

cudaError_t launch_gradients(const LossProblem& p, const AnchorState& st, const float* grad_loss, float* grad_rows,
                             float* grad_cols, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (p.num_rows * p.dim > 0) err = cudaMemsetAsync(grad_rows, 0, sizeof(float) * p.num_rows * p.dim, stream);
  if (err == cudaSuccess && p.num_cols * p.dim > 0)
    err = cudaMemsetAsync(grad_cols, 0, sizeof(float) * p.num_cols * p.dim, stream);
  if (err == cudaSuccess) err = launch_sweep<kSweepGradRows>(p, st, grad_loss, grad_rows, stream);
  if (err == cudaSuccess) err = launch_sweep<kSweepGradCols>(p, st, grad_loss, grad_cols, stream);
  return err;
}

}  // namespace mlcl_cuda
