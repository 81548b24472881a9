// Device helpers shared by the attention kernels: element conversions, mask reads and the
// global -> shared tile loads. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention/cuda/attention_kernels.h"

namespace l2p::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// An additive mask value m in the kernels' base-2 units, log2(e) * m. A finite m below
// -FLT_MAX / log2(e), such as finfo(float32).min (the masks of transformers and diffusers),
// would overflow to -inf and make a row that the float32 softmax of the reference and of SDPA
// spreads evenly over its keys (the score vanishes beside finfo.min) a dead row of zeros. It
// becomes -FLT_MAX instead, beside which the score vanishes the same way; -inf stays -inf.
// One compare and one select on top of the multiply. The CPU kernel's scaled_mask is the same.
__device__ __forceinline__ float scaled_mask(float m) {
  const float x = m * kLog2e;
  return (x == -INFINITY && m != -INFINITY) ? -FLT_MAX : x;
}

// lse * log2(e), the backward's base-2 shift of a row that attends to something (callers
// handle lse = -inf first). A row whose scores sit at -FLT_MAX stores lse = -FLT_MAX * ln(2)
// rounded, whose product with log2(e) can round past -FLT_MAX to -inf, and s - (-inf) = +inf
// would make its probabilities inf and its gradients NaN: clamped to -FLT_MAX (a max).
__device__ __forceinline__ float lse_log2(float lse) { return fmaxf(lse * kLog2e, -FLT_MAX); }

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

// Each kernel has its own parameter struct, and its field order is part of the kernel's
// code: ptxas allocates registers differently when it changes (the Hopper forward went from
// 16 to 92 bytes of spills when these structs shared one base). The launchers fill the
// fields the structs have in common, by name, with these.

// The problem's sizes; `group` = query heads per key/value head.
template <typename Params>
__host__ inline void set_sizes(Params& p, const AttentionShape& s) {
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.group = s.q_heads / s.kv_heads;
  p.q_len = s.q_len;
  p.kv_len = s.kv_len;
  p.head_dim = static_cast<int>(s.head_dim);
  p.value_dim = static_cast<int>(s.value_dim);
}

// A tensor-core forward kernel's tensors and sizes. The kernels exponentiate with exp2, so
// the softmax scale comes premultiplied by log2(e).
template <typename Params>
__host__ inline void set_forward(Params& p, const AttentionForwardArgs& args) {
  p.q = static_cast<decltype(p.q)>(args.q);
  p.k = static_cast<decltype(p.k)>(args.k);
  p.v = static_cast<decltype(p.v)>(args.v);
  p.out = static_cast<decltype(p.out)>(args.out);
  p.lse = args.lse;
  set_sizes(p, args.shape);
  p.scale_log2 = static_cast<float>(args.shape.scale) * kLog2e;
}

// A tensor-core backward kernel's tensors and sizes; dQ goes into the fp32 grad_q_accum.
template <typename Params>
__host__ inline void set_backward(Params& p, const AttentionBackwardArgs& args) {
  p.grad_out = static_cast<decltype(p.grad_out)>(args.grad_out);
  p.q = static_cast<decltype(p.q)>(args.q);
  p.k = static_cast<decltype(p.k)>(args.k);
  p.v = static_cast<decltype(p.v)>(args.v);
  p.lse = args.lse;
  p.delta = static_cast<const float*>(args.delta);
  p.grad_q_accum = args.grad_q_accum;
  p.grad_k = static_cast<decltype(p.grad_k)>(args.grad_k);
  p.grad_v = static_cast<decltype(p.grad_v)>(args.grad_v);
  set_sizes(p, args.shape);
  p.scale = static_cast<float>(args.shape.scale);
  p.scale_log2 = static_cast<float>(args.shape.scale) * kLog2e;
}

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

__host__ inline bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// The current device's compute capability major version (0 when it cannot be read).
__host__ inline int compute_capability_major() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return 0;
  }
  return major;
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

// Launches kernel(p) on a (tiles, heads) grid of `threads`-thread blocks with `smem` bytes of
// dynamic shared memory (opted into first: above 48 KB a launch fails without it), in slices
// of heads as launch_head_slices does, p.head_offset the slice's first head.
template <typename Params>
__host__ inline cudaError_t launch_over_heads(void (*kernel)(Params), Params p, int64_t tiles,
                                              int64_t heads, int threads, size_t smem,
                                              cudaStream_t stream) {
  if (smem > 0) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  return launch_head_slices(heads, [&](int64_t first, unsigned count) {
    p.head_offset = first;
    kernel<<<dim3(static_cast<unsigned>(tiles), count), threads, smem, stream>>>(p);
  });
}

// Head dim padded to a tensor-core tile width: 64, 128 or 256 (0 beyond 256).
__host__ inline int padded_head_dim(int64_t head_dim, int64_t value_dim) {
  const int64_t d = head_dim > value_dim ? head_dim : value_dim;
  if (d <= 64) return 64;
  if (d <= 128) return 128;
  if (d <= 256) return 256;
  return 0;
}

// What the mma.sync and wgmma kernels need of every problem: 16-bit floats, and head dims that
// are multiples of 8 (rows of whole 16-byte vectors) padded to 64 or 128. Returns the padded
// head dim, or 0 where the problem is not one of theirs.
__host__ inline int register_tile_head_dim(const AttentionShape& s) {
  if (s.dtype != AttentionDType::kBFloat16 && s.dtype != AttentionDType::kFloat16) return 0;
  if (s.head_dim % 8 != 0 || s.value_dim % 8 != 0) return 0;
  const int dp = padded_head_dim(s.head_dim, s.value_dim);
  return dp == 64 || dp == 128 ? dp : 0;
}

template <typename T>
struct Type {
  using type = T;
};

// f(Type<__nv_bfloat16>{}) or f(Type<__half>{}) for the 16-bit dtypes, an invalid-value error
// for the others.
template <typename F>
__host__ inline cudaError_t dispatch_16bit(AttentionDType dtype, F&& f) {
  if (dtype == AttentionDType::kBFloat16) return f(Type<__nv_bfloat16>{});
  if (dtype == AttentionDType::kFloat16) return f(Type<__half>{});
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, DP>{}) for a padded head dim DP of 64 or 128, an invalid-value
// error for any other.
template <typename F>
__host__ inline cudaError_t dispatch_64_128(int padded_dim, F&& f) {
  switch (padded_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace l2p::cuda::attn
