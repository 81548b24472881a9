// Row-major GEMM on raw pointers for the CPU kernels, called from inside at::parallel_for
// (the BLAS then runs single-threaded on each worker, which is what the tiled kernels want).
#pragma once

#include <cstdint>

namespace l2p::cpu {

// C[m,n] = alpha * op(A)[m,k] @ op(B)[k,n] + beta * C[m,n], all row-major;
// op(A) = A^T when trans_a (then A is stored k x m with leading dimension lda).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

// "blas" when torch's own BLAS is called directly, "aten" when it goes through at::mm.
const char* gemm_backend_name();

}  // namespace l2p::cpu
