// Row-major GEMMs on tile buffers and the vectorised elementwise steps of the softmax tiles.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

#if defined(__AVX2__) && defined(__FMA__)
// The same polynomial as exp_tile(float), eight lanes at a time.
inline __m256 exp_tile8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

template <typename T>
inline T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// sum_j exp(s_j - shift)
template <typename T>
inline T sum_exp(const T* s, int64_t n, T shift) {
  T acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += exp_tile(s[j] - shift);
  return acc;
}

// s_j <- coef * exp(s_j - shift)
template <typename T>
inline void scaled_exp(T* s, int64_t n, T shift, T coef) {
  for (int64_t j = 0; j < n; ++j) s[j] = coef * exp_tile(s[j] - shift);
}

// h_c = ci * exp(s_c - a + lb_c) + cj_c * exp(s_c - sh_c + b): one entry of G_IJ + G_JI^T before
// the positives' corrections (backward.cpp, symmetric tiles)
template <typename T>
inline void pair_exp(const T* s, const T* lb, const T* sh, const T* cj, T* h, int64_t n, T ci, T a, T b) {
  for (int64_t c = 0; c < n; ++c) h[c] = ci * exp_tile(s[c] - a + lb[c]) + cj[c] * exp_tile(s[c] - sh[c] + b);
}

// sum_c exp(s_c - a + lb_c), and col_c += exp(s_c - m_c + b) for every c: the row and column
// softmax sums of one symmetric tile row (forward.cpp); col may be null (row sums only)
template <typename T>
inline T pair_sums(const T* s, const T* lb, const T* m, T* col, int64_t n, T a, T b) {
  T acc = 0;
  for (int64_t c = 0; c < n; ++c) {
    acc += exp_tile(s[c] - a + lb[c]);
    if (col != nullptr) col[c] += exp_tile(s[c] - m[c] + b);
  }
  return acc;
}

#if defined(__AVX2__) && defined(__FMA__)
template <>
inline float pair_sums<float>(const float* s, const float* lb, const float* m, float* col, int64_t n, float a,
                              float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 vs = _mm256_loadu_ps(s + c);
    acc = _mm256_add_ps(acc, exp_tile8(_mm256_add_ps(_mm256_sub_ps(vs, va), _mm256_loadu_ps(lb + c))));
    if (col != nullptr) {
      const __m256 e = exp_tile8(_mm256_add_ps(_mm256_sub_ps(vs, _mm256_loadu_ps(m + c)), vb));
      _mm256_storeu_ps(col + c, _mm256_add_ps(_mm256_loadu_ps(col + c), e));
    }
  }
  float out = horizontal_sum(acc);
  for (; c < n; ++c) {
    out += exp_tile(s[c] - a + lb[c]);
    if (col != nullptr) col[c] += exp_tile(s[c] - m[c] + b);
  }
  return out;
}

template <>
inline void pair_exp<float>(const float* s, const float* lb, const float* sh, const float* cj, float* h, int64_t n,
                            float ci, float a, float b) {
  const __m256 vci = _mm256_set1_ps(ci), va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 vs = _mm256_loadu_ps(s + c);
    const __m256 e1 = exp_tile8(_mm256_add_ps(_mm256_sub_ps(vs, va), _mm256_loadu_ps(lb + c)));
    const __m256 e2 = exp_tile8(_mm256_add_ps(_mm256_sub_ps(vs, _mm256_loadu_ps(sh + c)), vb));
    _mm256_storeu_ps(h + c, _mm256_fmadd_ps(vci, e1, _mm256_mul_ps(_mm256_loadu_ps(cj + c), e2)));
  }
  for (; c < n; ++c) h[c] = ci * exp_tile(s[c] - a + lb[c]) + cj[c] * exp_tile(s[c] - sh[c] + b);
}

template <>
inline float row_max<float>(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float out = _mm_cvtss_f32(h);
  for (; j < n; ++j) out = s[j] > out ? s[j] : out;
  return out;
}

template <>
inline float sum_exp<float>(const float* s, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_add_ps(a0, exp_tile8(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh)));
    a1 = _mm256_add_ps(a1, exp_tile8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), sh)));
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_add_ps(a0, exp_tile8(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh)));
  float acc = horizontal_sum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) acc += exp_tile(s[j] - shift);
  return acc;
}

template <>
inline void scaled_exp<float>(float* s, int64_t n, float shift, float coef) {
  const __m256 sh = _mm256_set1_ps(shift), c = _mm256_set1_ps(coef);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(s + j, _mm256_mul_ps(c, exp_tile8(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh))));
  }
  for (; j < n; ++j) s[j] = coef * exp_tile(s[j] - shift);
}
#endif

}  // namespace mlcl_fast
