#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "tile_math.h"

// The Fortran BLAS entry points that torch's CPU library exports when it links a BLAS (MKL or
// OpenBLAS, 32-bit integers). Weak: a torch without them leaves these null and at::mm is used.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace mlcl_fast {

namespace {

bool use_blas() {
  const char* env = std::getenv("MLCL_FAST_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  return sgemm_ != nullptr && dgemm_ != nullptr;
}

template <typename T>
void blas(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
          T beta, T* c, int64_t ldc) {
  TORCH_CHECK(m <= std::numeric_limits<int>::max() && n <= std::numeric_limits<int>::max() &&
                  k <= std::numeric_limits<int>::max(),
              "gemm: tile dimensions exceed the 32-bit BLAS interface");
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

}  // namespace

const char* gemm_provider() { return use_blas() ? "blas" : "aten"; }

// BLAS is column-major: a row-major [r x c] buffer is the column-major [c x r] transpose, so each
// product below is computed as its transpose with the operands swapped.

template <typename T>
void gemm_abt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
              int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_blas()) {
    blas<T>('T', 'N', n, m, k, alpha, b, ldb, a, lda, T(0), c, ldc);
    return;
  }
  auto out = view(c, m, n, ldc);
  at::mm_out(out, view(a, m, k, lda), view(b, n, k, ldb).t());
  out.mul_(alpha);
}

template <typename T>
void gemm_ab_acc(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return;
  if (use_blas()) {
    blas<T>('N', 'N', n, m, k, alpha, b, ldb, a, lda, T(1), c, ldc);
    return;
  }
  view(c, m, n, ldc).addmm_(view(a, m, k, lda), view(b, k, n, ldb), 1, alpha);
}

template <typename T>
void gemm_atb_acc(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                  int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return;
  if (use_blas()) {
    blas<T>('N', 'T', n, m, k, alpha, b, ldb, a, lda, T(1), c, ldc);
    return;
  }
  view(c, m, n, ldc).addmm_(view(a, k, m, lda).t(), view(b, k, n, ldb), 1, alpha);
}

#define MLCL_FAST_INSTANTIATE(T)                                                                               \
  template void gemm_abt<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T*, int64_t);    \
  template void gemm_ab_acc<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T*, int64_t); \
  template void gemm_atb_acc<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T*, int64_t);
MLCL_FAST_INSTANTIATE(float)
MLCL_FAST_INSTANTIATE(double)
#undef MLCL_FAST_INSTANTIATE

}  // namespace mlcl_fast
