// The blocked algorithm's per-block CUDA kernels (see block_kernels.h). The products themselves
// are cuBLAS calls made by the loop (csrc/cpu/blocked.cpp); these kernels only read and write the
// block's [rows, columns] buffers once or twice each. Every reduction runs in a fixed order
// (warp butterflies and shared-memory trees): bitwise deterministic, no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/block_kernels.h"

namespace mlcl_block {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // per block; row_stats: one block per anchor
constexpr int kWarpsPerBlock = kThreads / kWarp;

// Butterfly reduction: every lane ends with the same, bitwise identical value.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Tree sum over the block's threads in a fixed order; every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const float out = scratch[0];
  __syncthreads();
  return out;
}

// (max, sum of exp(x - max)) pairs merged in a fixed tree order.
__device__ void block_lse(float& m, float& l, float* sm, float* sl) {
  sm[threadIdx.x] = m;
  sl[threadIdx.x] = l;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) {
      const float m1 = sm[threadIdx.x], m2 = sm[threadIdx.x + s];
      const float mm = fmaxf(m1, m2);
      if (mm != -INFINITY) sl[threadIdx.x] = sl[threadIdx.x] * __expf(m1 - mm) + sl[threadIdx.x + s] * __expf(m2 - mm);
      sm[threadIdx.x] = mm;
    }
    __syncthreads();
  }
  m = sm[0];
  l = sl[0];
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) positives_kernel(BlockProblem p, AnchorStats st, Block b, bool compute_z) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= b.rows) return;  // whole warps leave together
  const int64_t row = b.row0 + i;
  const int32_t ai = p.row_count[row];
  const int32_t* labels = p.row_labels + row * p.row_width;
  // Within one label the columns are distinct, so the lanes never write the same entry; the
  // label slots follow one another, so each entry's sum has a fixed order.
  if (p.needs_counts) {
    float* counts = b.counts + i * p.num_cols;
    for (int32_t t = 0; t < ai; ++t) {
      const int32_t hi = p.label_ptr[labels[t] + 1];
      for (int32_t e = p.label_ptr[labels[t]] + lane; e < hi; e += kWarp) counts[p.label_cols[e]] += 1.0f;
      __syncwarp();
    }
  }
  if (!label_centric(p)) return;
  float* z = st.normaliser + row * p.row_width;
  float* inv_z = b.inv_z + i * p.num_cols;
  for (int32_t t = 0; t < ai; ++t) {
    const int32_t lo = p.label_ptr[labels[t]], hi = p.label_ptr[labels[t] + 1];
    float zt;
    if (compute_z) {
      float sum = 0.0f;
      for (int32_t e = lo + lane; e < hi; e += kWarp) {
        const int64_t j = p.label_cols[e];
        if (in_softmax(p, row, j)) sum += block_factor(p, b, i, j);
      }
      zt = warp_sum(sum);
      if (lane == 0) z[t] = zt;
    } else {
      zt = z[t];
    }
    if (zt > 0.0f) {
      const float inv = 1.0f / zt;
      for (int32_t e = lo + lane; e < hi; e += kWarp) inv_z[p.label_cols[e]] += inv;
    }
    __syncwarp();
  }
  if (compute_z && lane == 0) {
    for (int32_t t = ai; t < p.row_width; ++t) z[t] = 0.0f;
    st.total_weight[row] = label_total_weight(p, st.normaliser, row);
  }
}

__global__ void __launch_bounds__(kThreads) row_stats_kernel(BlockProblem p, AnchorStats st, Block b) {
  __shared__ float scratch[2][kThreads];
  const int64_t i = blockIdx.x;
  const int64_t row = b.row0 + i;
  const bool label = label_centric(p);
  const float* dots = b.logits + i * p.num_cols;
  float m = -INFINITY, l = 0.0f, weighted = 0.0f, omega = 0.0f;
  for (int64_t j = threadIdx.x; j < p.num_cols; j += kThreads) {
    if (!in_softmax(p, row, j)) continue;
    const float x = softmax_logit(p, dots[j], j);
    if (x > m) {
      l = l * __expf(m - x) + 1.0f;
      m = x;
    } else {
      l += __expf(x - m);
    }
    const float s = dots[j] * p.inv_temperature;
    if (label) {
      weighted += label_weight(p, b, i, j) * s;
    } else {
      const float w = block_omega(p, b, i, j);
      omega += w;
      weighted += w * s;
    }
  }
  block_lse(m, l, scratch[0], scratch[1]);
  weighted = block_sum(weighted, scratch[0]);
  if (!label) {
    omega = block_sum(omega, scratch[0]);
    if (threadIdx.x == 0) {
      st.normaliser[row] = omega;
      st.total_weight[row] = omega > 0.0f ? 1.0f : 0.0f;
    }
    weighted = omega > 0.0f ? weighted / omega : 0.0f;
    __syncthreads();
  }
  const float lse = l > 0.0f ? m + __logf(l) : 0.0f;
  float regulariser = 0.0f;
  if (p.reg && st.total_weight[row] > 0.0f) {
    for (int64_t j = threadIdx.x; j < p.num_cols; j += kThreads) {
      if (!in_softmax(p, row, j)) continue;
      const float w = block_weight(p, st, b, i, j);
      const float prob = __expf(softmax_logit(p, dots[j], j) - lse);
      regulariser += reg_term(p, prob, w) * dots[j] * p.inv_temperature;
    }
    regulariser = block_sum(regulariser, scratch[0]);
  }
  if (threadIdx.x == 0) finish_anchor(st, row, lse, weighted, regulariser);
}

__device__ __forceinline__ void store(float* out, int64_t e, float v) { out[e] = v; }
__device__ __forceinline__ void store(__half* out, int64_t e, float v) { out[e] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* out, int64_t e, float v) { out[e] = __float2bfloat16_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gradient_kernel(BlockProblem p, AnchorStats st, Block b, const float* grad_loss, T* out, int64_t chunks) {
  const int64_t i = blockIdx.x / chunks;
  const int64_t j = (blockIdx.x % chunks) * kThreads + threadIdx.x;
  if (j >= p.num_cols) return;
  store(out, i * p.num_cols + j, pair_grad(p, st, b, grad_loss, i, j));
}

}  // namespace

cudaError_t launch_positives(const BlockProblem& p, const AnchorStats& st, const Block& b, bool compute_z,
                             cudaStream_t stream) {
  if (b.rows == 0 || (!p.needs_counts && !label_centric(p))) return cudaSuccess;
  const int64_t blocks = (b.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  positives_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, st, b, compute_z);
  return cudaGetLastError();
}

cudaError_t launch_row_stats(const BlockProblem& p, const AnchorStats& st, const Block& b, cudaStream_t stream) {
  if (b.rows == 0) return cudaSuccess;
  row_stats_kernel<<<static_cast<unsigned>(b.rows), kThreads, 0, stream>>>(p, st, b);
  return cudaGetLastError();
}

cudaError_t launch_gradient(const BlockProblem& p, const AnchorStats& st, const Block& b, const float* grad_loss,
                            void* out, CoefKind kind, cudaStream_t stream) {
  if (b.rows == 0 || p.num_cols == 0) return cudaSuccess;
  const int64_t chunks = (p.num_cols + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(b.rows * chunks);
  switch (kind) {
    case kCoefFloat16:
      gradient_kernel<<<grid, kThreads, 0, stream>>>(p, st, b, grad_loss, static_cast<__half*>(out), chunks);
      break;
    case kCoefBFloat16:
      gradient_kernel<<<grid, kThreads, 0, stream>>>(p, st, b, grad_loss, static_cast<__nv_bfloat16*>(out), chunks);
      break;
    default:
      gradient_kernel<<<grid, kThreads, 0, stream>>>(p, st, b, grad_loss, static_cast<float*>(out), chunks);
  }
  return cudaGetLastError();
}

}  // namespace mlcl_block
