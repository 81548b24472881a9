// The torch-facing half of the GPU patch ops: the image is processed in chunks of tokens,
// each gathered into (or scattered from) a bounded patch matrix around one cuBLAS GEMM on
// the current stream, so no more than one chunk of the image is ever unfolded.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "common/cuda/patch_copy.h"

namespace l2p::cuda {

// Large enough that a 4096^2 image at p=16 is one chunk, small enough that the patch matrix
// stays a bounded scratch buffer (at most 2^26 elements). The GPU time of the GEMMs and copies is
// the same for one chunk or two, but each chunk costs a cuBLAS call and a copy launch on the host:
// on an H200 one chunk of 65536 tokens took 2-4% less time per lone unpatchify call than two of
// 32768, and 4-6% less per patch_embed call (bench/RESULTS.md, "chunk size").
constexpr int64_t kMaxChunkTokens = 65536;
constexpr int64_t kMaxChunkElements = int64_t{1} << 26;

// L2P_PATCH_CHUNK_TOKENS=n (a positive integer) sets the chunk instead, past both bounds: a knob
// for timing other chunk sizes (bench/gpu/patch_chunks_ab.py), read on every call.
inline int64_t chunk_tokens(int64_t total_tokens, int64_t features) {
  if (const char* set = std::getenv("L2P_PATCH_CHUNK_TOKENS")) {
    char* end = nullptr;
    const long long tokens = std::strtoll(set, &end, 10);
    TORCH_CHECK(end != set && *end == '\0' && tokens > 0,
                "L2P_PATCH_CHUNK_TOKENS must be a positive integer (tokens per chunk), got '", set,
                "'; unset it for the default chunking");
    return std::max<int64_t>(1, std::min<int64_t>(total_tokens, tokens));
  }
  const int64_t by_size = kMaxChunkElements / std::max<int64_t>(features, 1);
  return std::max<int64_t>(1, std::min({total_tokens, kMaxChunkTokens, by_size}));
}

// matrix[0:chunk.count] <- patches of image (both contiguous, same dtype).
inline void gather_chunk(const at::Tensor& image, at::Tensor& matrix, const PatchChunk& chunk) {
  C10_CUDA_CHECK(gather_patches(image.const_data_ptr(), matrix.data_ptr(), chunk,
                                static_cast<int>(image.element_size()),
                                c10::cuda::getCurrentCUDAStream().stream()));
}

// image patches <- matrix[0:chunk.count].
inline void scatter_chunk(const at::Tensor& matrix, at::Tensor& image, const PatchChunk& chunk) {
  C10_CUDA_CHECK(scatter_patches(matrix.const_data_ptr(), image.data_ptr(), chunk,
                                 static_cast<int>(image.element_size()),
                                 c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace l2p::cuda
