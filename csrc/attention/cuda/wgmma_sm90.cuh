// Hopper warpgroup tensor-core building blocks (wgmma.mma_async, sm_90a) shared by the wgmma
// attention kernels (attention_fwd_wgmma.cu, attention_bwd_wgmma.cu): the 128-byte-swizzled
// shared-memory tile layout and its loads, matrix descriptors, the asynchronous product in its
// shared/shared and register/shared forms, and the fence / commit / wait protocol.
//
// Shared-memory layout: a (ROWS x DP) 16-bit tile is stored as DP / 64 column blocks, each
// (ROWS x 64) with 128-byte rows, in the 128-byte swizzle: the 16-byte chunk c (columns
// 8c..8c+7 of the block) of row r sits at chunk position c ^ (r % 8) of the row. Column block b
// starts at b * ROWS * 128 bytes; every block starts on a 1024-byte boundary (the hardware
// applies the swizzle to address bits [4:6] ^= [7:9] of the absolute shared address, so the
// pattern repeats every 8 rows = 1024 bytes and tiles must be 1024-aligned for the
// descriptors' base offset 0).
//
// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"; 64 bits):
//   bits  0-13  start address >> 4        bits 16-29  leading-dimension byte offset >> 4
//   bits 32-45  stride-dimension byte offset >> 4
//   bits 49-51  base offset (0: the swizzle pattern starts 1024-aligned)
//   bits 62-63  swizzle mode (1 = 128-byte swizzle)
// K-major operand (the reduced dim k is contiguous in the stored rows; imm-trans = 0): a k16
// step reads 32 bytes of each row, inside one 128-byte swizzled row; its start address is the
// column block plus 32 * (step % 4) bytes (the hardware swizzles the absolute address, so
// moving the start by 32 bytes inside the atom reads logical chunks 2j, 2j+1). Stride byte
// offset = 1024 (rows 0-7 to rows 8-15); leading byte offset unused (set to 16 bytes).
// MN-major operand (the stored rows are k, the 64 m or n values of a column block contiguous;
// imm-trans = 1, 16-bit types only): the 128-byte swizzle atom covers 8 k x 64 m/n. Leading
// byte offset = the distance between the 64-wide column blocks (ROWS * 128 bytes); stride byte
// offset = 1024 (k 0-7 to k 8-15); a k16 step starts 16 rows = 2048 bytes further.
//
// Register layouts (PTX ISA, wgmma .m64nNk16; warp w = warp index within the warpgroup,
// g = lane / 4, t = lane % 4):
//   accumulator D (f32, N / 2 registers): d[4j + e] = D(16w + g + 8 (e / 2), 8j + 2t + (e % 2))
//   A in registers (f16/bf16, 4 registers of 2 halves, the mma.m16n8k16 A layout per warp):
//     a[0] = A(16w + g, 2t..2t+1)  a[1] = A(16w + g + 8, 2t..)  a[2] = A(16w + g, 2t+8..)
//     a[3] = A(16w + g + 8, 2t+8..)   (low half = lower column)
// so the accumulator registers of n8 tiles 2s and 2s + 1, packed pairwise to 16 bits, are the
// A registers of k16 step s.
//
// Each kernel's numpy model in bench/gpu (attention_wgmma_emulation.py,
// emulate_attention_bwd_wgmma.py) reads shared memory through the same rules; keep them in step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"
#include "common/cuda/sm90.h"

// The wgmma bodies exist only in the sm_90a pass (wgmma needs the "a" target); the sm_80 pass
// keeps empty kernels that the launchers never start (their "supported" checks require
// compute capability 9.0 and a build that includes 9.0a).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define L2P_WGMMA_DEVICE 1
#endif

namespace l2p::cuda::attn::wgmma {

constexpr uint32_t kSwizzleRow = 128, kSwizzleAtom = 8 * kSwizzleRow;  // bytes

// Rows [row0, row0 + ROWS) x columns [0, DP) of a row-major (rows_valid, cols) matrix into the
// swizzled layout above at dst (1024-aligned); zeros outside the source. cols is a multiple of
// 8 and src 16-byte aligned. Consecutive threads of the THREADS copying copy consecutive chunks
// of a row.
template <typename T, int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_tile_swizzled(unsigned char* dst, const T* src, int64_t row0,
                                                   int64_t rows_valid, int cols) {
  constexpr int kChunks = DP / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "every thread copies the same number of chunks");
  // A trip count the same for every thread (not idx < ROWS * kChunks from threadIdx.x): these
  // copies are issued while wgmmas are in flight, and a loop ptxas cannot prove warpgroup-
  // uniform makes it serialize them (warning C7520). Fully unrolled: on an H200 the forward
  // ran at 344-358 / 395-399 TFLOP/s (N = 4096 / 16384) this way and at 262-281 / 306-309 with
  // the loop kept rolled (`unroll 1`), although unrolling costs 16 bytes of spill at DP = 128.
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / THREADS; ++it) {
    const int idx = it * THREADS + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks;
    const int c = idx - r * kChunks;
    const bool valid = row0 + r < rows_valid && 8 * c < cols;
    const T* from = valid ? src + (row0 + r) * cols + 8 * c : src;
    const uint32_t offset = (c / 8) * (ROWS * kSwizzleRow) + r * kSwizzleRow +
                            (((c % 8) ^ (r % 8)) * 16);
    mma::cp_async16(dst + offset, from, valid ? 16 : 0);
  }
}

// True on a compute capability 9.0 device (the current one) with at least smem_bytes of
// shared memory per block, in a build that includes sm_90a.
__host__ inline bool device_runs_wgmma(size_t smem_bytes) {
  return current_device_runs_sm90a() && smem_bytes <= static_cast<size_t>(max_shared_per_block());
}

#ifdef L2P_WGMMA_DEVICE

// A 128-byte-swizzle matrix descriptor (layout in the header comment).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  return uint64_t((address & 0x3FFFF) >> 4) | (uint64_t(leading_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32) | (uint64_t(1) << 62);
}

// Keeps the compiler from moving reads or writes of an accumulator (or of A registers a wgmma
// still reads) across the wgmma fence / wait instructions (the asm statements below are
// ordered among themselves, plain arithmetic on their registers is not).
template <int N>
__device__ __forceinline__ void pin(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async, st.shared) visible to the
// async proxy (wgmma operand reads); precedes the barrier after the writes.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define L2P_ACC8(d, i)                                                                      \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define L2P_ACC32(d) L2P_ACC8(d, 0), L2P_ACC8(d, 8), L2P_ACC8(d, 16), L2P_ACC8(d, 24)
#define L2P_ACC64(d) L2P_ACC32(d), L2P_ACC8(d, 32), L2P_ACC8(d, 40), L2P_ACC8(d, 48), L2P_ACC8(d, 56)
#define L2P_REGS32                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define L2P_REGS64                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

template <typename T>
struct TypeName;
template <>
struct TypeName<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};
template <>
struct TypeName<__half> {
  static constexpr bool kBf16 = false;
};

// D (64 x N, f32) = A (64 x 16, smem) B (16 x N, smem) + (accumulate ? D : 0), N = 64 or 128.
// TRANS_A / TRANS_B: 0 = the operand is stored K-major, 1 = M- / N-major.
template <typename T, int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  static_assert(TRANS_A == 0 || TRANS_A == 1, "imm-trans-a is 0 or 1");
  static_assert(TRANS_B == 0 || TRANS_B == 1, "imm-trans-b is 0 or 1");
  if constexpr (N == 128) {
#define L2P_WGMMA_SS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " L2P_REGS64    \
               ", %64, %65, p, 1, 1, %67, %68;\n}\n"                                          \
               : L2P_ACC64(d)                                                                  \
               : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))
    if constexpr (TypeName<T>::kBf16) {
      L2P_WGMMA_SS("bf16");
    } else {
      L2P_WGMMA_SS("f16");
    }
#undef L2P_WGMMA_SS
  } else {
    static_assert(N == 64, "N is 64 or 128");
#define L2P_WGMMA_SS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " L2P_REGS32     \
               ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                          \
               : L2P_ACC32(d)                                                                  \
               : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))
    if constexpr (TypeName<T>::kBf16) {
      L2P_WGMMA_SS("bf16");
    } else {
      L2P_WGMMA_SS("f16");
    }
#undef L2P_WGMMA_SS
  }
}

// D (64 x N, f32) += A (64 x 16, registers) B (16 x N, smem, N-major: imm-trans-b = 1),
// N = 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void mma_rs_nmajor(float (&d)[N / 2], const uint32_t (&a)[4],
                                              uint64_t b) {
  if constexpr (N == 128) {
#define L2P_WGMMA_RS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " L2P_REGS64    \
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                \
               : L2P_ACC64(d)                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
    if constexpr (TypeName<T>::kBf16) {
      L2P_WGMMA_RS("bf16");
    } else {
      L2P_WGMMA_RS("f16");
    }
#undef L2P_WGMMA_RS
  } else {
    static_assert(N == 64, "N is 64 or 128");
#define L2P_WGMMA_RS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " L2P_REGS32     \
               ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                \
               : L2P_ACC32(d)                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
    if constexpr (TypeName<T>::kBf16) {
      L2P_WGMMA_RS("bf16");
    } else {
      L2P_WGMMA_RS("f16");
    }
#undef L2P_WGMMA_RS
  }
}

#undef L2P_ACC8
#undef L2P_ACC32
#undef L2P_ACC64
#undef L2P_REGS32
#undef L2P_REGS64

// The accumulator registers of a 64 x (16 * STEPS) product, packed to 16 bits, as the
// register-A operands of STEPS k16 steps (n8 tiles 2s and 2s + 1 -> step s).
template <typename T, int STEPS>
__device__ __forceinline__ void pack_a(uint32_t (&a)[STEPS][4], const float (&d)[8 * STEPS]) {
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    a[s][0] = mma::pack2<T>(d[8 * s + 0], d[8 * s + 1]);
    a[s][1] = mma::pack2<T>(d[8 * s + 2], d[8 * s + 3]);
    a[s][2] = mma::pack2<T>(d[8 * s + 4], d[8 * s + 5]);
    a[s][3] = mma::pack2<T>(d[8 * s + 6], d[8 * s + 7]);
  }
}

#endif  // L2P_WGMMA_DEVICE

}  // namespace l2p::cuda::attn::wgmma
