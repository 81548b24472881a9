// Launchers of the GPU attention kernels. Plain C++ types only: the kernels live in .cu files
// that include nothing but CUDA headers, and attention_cuda.cpp (the torch-facing side)
// checks the inputs, allocates, picks a kernel and calls these on the current stream.
//
// Layouts (all contiguous, row-major): q (B,Hq,Nq,Dh), k (B,Hk,Nk,Dh), v (B,Hk,Nk,Dv),
// out / grad_out (B,Hq,Nq,Dv), lse (B,Hq,Nq) float32; query head h reads key/value head
// h / (Hq/Hk). The optional float32 additive mask is read as
// mask[b*s0 + h*s1 + i*s2 + j*s3], so broadcast dimensions cost nothing (stride 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace l2p::cuda {

enum class AttentionDType { kFloat32, kFloat64, kBFloat16, kFloat16 };

struct AttentionShape {
  AttentionDType dtype;
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim;
  double scale;
  const float* mask;  // nullptr: no mask
  int64_t mask_stride[4];
};

struct AttentionForwardArgs {
  AttentionShape shape;
  const void *q, *k, *v;
  void* out;
  float* lse;
};

struct AttentionBackwardArgs {
  AttentionShape shape;
  const void *grad_out, *q, *k, *v, *out;
  const float* lse;
  // rowsum(grad_out * out), (B,Hq,Nq): double for float64 inputs, float otherwise.
  void* delta;
  void *grad_q, *grad_k, *grad_v;
  // Tensor-core path only: (B,Hq,Nq,Dh) float32, zero-filled; the kernel adds dQ into it and
  // the caller casts it into grad_q.
  float* grad_q_accum;
};

// Register-resident tensor-core forward (mma.sync, flash-attention-2 layout): bfloat16 /
// float16, padded head dim 64 or 128, head dims multiples of 8, 16-byte aligned tensors, sm_80+.
bool attention_forward_mma_supported(const AttentionForwardArgs& args);
cudaError_t attention_forward_mma(const AttentionForwardArgs& args, cudaStream_t stream);

// Hopper forward (wgmma.mma_async, sm_90a): bfloat16 / float16 without a mask, padded head
// dim 64 or 128, the same conditions as the mma.sync forward otherwise; compute capability 9.0
// and a build that includes sm_90a. Used first where supported (L2P_ATTENTION_WGMMA=0: off).
bool attention_forward_wgmma_supported(const AttentionForwardArgs& args);
cudaError_t attention_forward_wgmma(const AttentionForwardArgs& args, cudaStream_t stream);

// Hopper backward (wgmma.mma_async, sm_90a): bfloat16 / float16 without a mask, padded head dim
// 64 or 128, 16-byte aligned tensors; compute capability 9.0 and a build that includes sm_90a. Adds dQ
// into grad_q_accum like the mma.sync backward. Used first where supported (off with
// L2P_ATTENTION_WGMMA=0 or L2P_ATTENTION_WGMMA_BACKWARD=0).
bool attention_backward_wgmma_supported(const AttentionBackwardArgs& args);
cudaError_t attention_backward_wgmma(const AttentionBackwardArgs& args, cudaStream_t stream);

// Register-resident tensor-core backward (mma.sync), same conditions. Both tensor-core
// backward kernels add dQ into grad_q_accum.
bool attention_backward_mma_supported(const AttentionBackwardArgs& args);
cudaError_t attention_backward_mma(const AttentionBackwardArgs& args, cudaStream_t stream);

// Tensor-core (WMMA) kernels: bfloat16 / float16, head dims up to 256 (padded in shared
// memory to 64, 128 or 256). "supported" also checks the device's shared-memory limit.
bool attention_forward_tc_supported(const AttentionShape& shape);
cudaError_t attention_forward_tc(const AttentionForwardArgs& args, cudaStream_t stream);
bool attention_backward_tc_supported(const AttentionShape& shape);
cudaError_t attention_backward_tc(const AttentionBackwardArgs& args, cudaStream_t stream);

// CUDA-core kernels: every dtype and head dim up to kMaxSimpleHeadDim; one warp per row.
// They serve float32 / float64 and any half-precision case the tensor-core path declines.
constexpr int64_t kMaxSimpleHeadDim = 256;
cudaError_t attention_forward_simple(const AttentionForwardArgs& args, cudaStream_t stream);
cudaError_t attention_backward_simple(const AttentionBackwardArgs& args, cudaStream_t stream);

// delta = rowsum(grad_out * out), the first step of every backward pass.
cudaError_t attention_backward_delta(const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace l2p::cuda
