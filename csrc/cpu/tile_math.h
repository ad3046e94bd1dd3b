// Row-major GEMMs on tile buffers and the vectorised elementwise steps of the softmax tiles.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mlcl_fast {

// C[m x n] = alpha * A[m x k] * B[n x k]^T
template <typename T>
void gemm_abt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
              int64_t ldc);
// C[m x n] += alpha * A[m x k] * B[k x n]
template <typename T>
void gemm_ab_acc(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc);
// C[m x n] += alpha * A[k x m]^T * B[k x n]
template <typename T>
void gemm_atb_acc(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                  int64_t ldc);

// Which GEMM the kernels call: the BLAS that torch links (its Fortran symbols), or at::mm.
// MLCL_FAST_CPU_GEMM=aten forces at::mm; it is also the fallback when no BLAS symbol exists.
const char* gemm_provider();

// exp for the softmax tiles: a branch-free Cephes-style polynomial (about 2 ulp) that the
// compiler vectorises; inputs are <= 0 here, and very negative ones flush to (almost) 0.
inline float exp_tile(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_tile(double x) { return std::exp(x); }

template <typename T>
inline T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// sum_j exp(s_j - shift)
template <typename T>
inline T sum_exp(const T* s, int64_t n, T shift) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += exp_tile(s[j] - shift);
  return acc;
}

// s_j <- coef * exp(s_j - shift)
template <typename T>
inline void scaled_exp(T* s, int64_t n, T shift, T coef) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = coef * exp_tile(s[j] - shift);
}

}  // namespace mlcl_fast
