// The torch-facing half of the GPU patch ops: the image is processed in chunks of tokens,
// each gathered into (or scattered from) a bounded patch matrix around one cuBLAS GEMM on
// the current stream, so no more than one chunk of the image is ever unfolded.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/patch_copy.h"

namespace l2p::cuda {

// Large enough that each GEMM fills the GPU (a 4096^2 image at p=16 is two chunks), small
// enough that the patch matrix stays a bounded scratch buffer (at most 2^25 elements).
constexpr int64_t kMaxChunkTokens = 32768;
constexpr int64_t kMaxChunkElements = int64_t{1} << 25;

inline int64_t chunk_tokens(int64_t total_tokens, int64_t features) {
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
