// Device helpers shared by the attention kernels: element conversions, mask reads and the
// global -> shared tile loads. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/attention_kernels.h"

namespace l2p::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 2^x as one MUFU.EX2 instruction: exp2f without fast-math adds the handling of denormal
// results, which softmax weights below 2^-126 of the row maximum do not need (they flush to 0).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Adds four consecutive floats (16-byte aligned) into global memory: one vector atomic where
// the hardware has it (sm_90), four scalar ones before.
__device__ __forceinline__ void atomic_add4(float* dst, float4 x) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), x);
#else
  atomicAdd(dst, x.x);
  atomicAdd(dst + 1, x.y);
  atomicAdd(dst + 2, x.z);
  atomicAdd(dst + 3, x.w);
#endif
}

// Additive mask value for (b, h, i, j), or 0 without a mask.
struct MaskView {
  const float* ptr;
  int64_t s0, s1, s2, s3;

  __host__ static MaskView of(const AttentionShape& shape) {
    return MaskView{shape.mask, shape.mask_stride[0], shape.mask_stride[1],
                    shape.mask_stride[2], shape.mask_stride[3]};
  }
  // Pointer to mask[b, h, i, 0]; nullptr without a mask.
  __device__ __forceinline__ const float* row(int64_t b, int64_t h, int64_t i) const {
    return ptr == nullptr ? nullptr : ptr + b * s0 + h * s1 + i * s2;
  }
};

// Copies rows [row0, row0 + ROWS) x columns [0, cols) of a row-major (rows_valid, cols)
// matrix into a (ROWS, WIDTH) shared tile with leading dimension LD; everything outside the
// source (rows past rows_valid, columns past cols) is zero, so padded head dims and ragged
// sequence ends contribute nothing to the products. vec: 16-byte loads are allowed (cols is
// a multiple of 8 and the source 16-byte aligned).
template <typename T, int ROWS, int WIDTH, int LD, int THREADS>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src,
                                          int64_t row0, int64_t rows_valid, int cols, bool vec) {
  static_assert(sizeof(T) == 2, "tiles hold 16-bit elements");
  if (vec) {
    constexpr int kChunks = WIDTH / 8;  // 8 elements = 16 bytes
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
      const int r = idx / kChunks;
      const int col = (idx - r * kChunks) * 8;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (row0 + r < rows_valid && col < cols) {
        value = *reinterpret_cast<const uint4*>(src + (row0 + r) * cols + col);
      }
      *reinterpret_cast<uint4*>(dst + r * LD + col) = value;
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * WIDTH; idx += THREADS) {
      const int r = idx / WIDTH;
      const int col = idx - r * WIDTH;
      T value = from_float<T>(0.0f);
      if (row0 + r < rows_valid && col < cols) value = src[(row0 + r) * cols + col];
      dst[r * LD + col] = value;
    }
  }
}

__host__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Largest dynamic shared memory a block may opt into on the current device.
__host__ inline int max_shared_per_block() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    return 0;
  }
  return bytes;
}

// Launches a kernel over `heads` (batch, head) pairs in slices, gridDim.y being at most 65535:
// launch_slice(first, count) sets the slice's offset in the kernel's parameters and launches it
// with count as gridDim.y. Returns the first launch error.
template <typename LaunchSlice>
__host__ inline cudaError_t launch_head_slices(int64_t heads, LaunchSlice&& launch_slice) {
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t first = 0; first < heads; first += kMaxGridY) {
    launch_slice(first, static_cast<unsigned>(heads - first < kMaxGridY ? heads - first : kMaxGridY));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Head dim padded to a tensor-core tile width: 64, 128 or 256 (0 beyond 256).
__host__ inline int padded_head_dim(int64_t head_dim, int64_t value_dim) {
  const int64_t d = head_dim > value_dim ? head_dim : value_dim;
  if (d <= 64) return 64;
  if (d <= 128) return 128;
  if (d <= 256) return 256;
  return 0;
}

}  // namespace l2p::cuda::attn
