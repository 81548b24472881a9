// Un-patchify as one Hopper GEMM whose epilogue writes the image (unpatchify_gemm_sm90.cu).
// Plain C++ types only: included by that .cu and by the torch-facing unpatchify_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace l2p::cuda {

// The mainloop schedule (unpatchify_gemm_sm90.cuh): which is faster is for the GPU to say.
enum class FusedUnpatchifySchedule { kCooperative, kPingpong };

struct FusedUnpatchify {
  const void* tokens;  // (batch * tokens per image, dim), row-major
  const void* weight;  // (channels * patch * patch, dim), row-major (nn.Linear's layout)
  const void* bias;    // (channels * patch * patch,) or nullptr
  void* image;         // (batch, channels, height, width), contiguous
  int64_t batch, channels, height, width, patch, dim;
  bool half;           // float16 (true) or bfloat16 (false)
  FusedUnpatchifySchedule schedule;
};

// Whether the fused kernel can take this problem on the current device: a build with sm_90a,
// a compute capability 9.0 GPU, a power-of-two patch >= 2, dim a multiple of 8 and 16-byte
// aligned tokens / weight (what the kernel's TMA loads need).
bool fused_unpatchify_supported(const FusedUnpatchify& problem);

// Scratch bytes the launch needs (CUTLASS's tile scheduler may ask for some; the caller allocates).
size_t fused_unpatchify_workspace_bytes(const FusedUnpatchify& problem);

// Runs it on `stream`; cudaErrorNotSupported where fused_unpatchify_supported is false.
cudaError_t fused_unpatchify(const FusedUnpatchify& problem, void* workspace, cudaStream_t stream);

}  // namespace l2p::cuda
