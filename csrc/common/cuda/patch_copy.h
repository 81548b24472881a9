// Moving pixel patches between an image batch (B,C,H,W) and a chunk of a row-major patch
// matrix (tokens, C*p*p) with columns ordered c*p*p + i*p + j (Conv2d's weight layout), on
// the GPU. Plain C++ types only: included by the .cu that holds the kernel and by the
// torch-facing .cpp files that launch it between cuBLAS calls.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace l2p::cuda {

struct PatchChunk {
  int64_t channels, height, width, patch;
  // Tokens first_token .. first_token + count - 1, numbered over the whole batch
  // (token n of image b is b * (H/p) * (W/p) + n); patch-matrix row t is token first_token + t.
  int64_t first_token, count;
};

// matrix[t, c*p*p + i*p + j] = image[b, c, row*p + i, col*p + j] for the chunk's tokens.
// element_size is 2, 4 or 8 bytes; the copy moves bits, so it serves every dtype.
cudaError_t gather_patches(const void* image, void* matrix, const PatchChunk& chunk,
                           int element_size, cudaStream_t stream);

// The inverse: image[b, c, row*p + i, col*p + j] = matrix[t, c*p*p + i*p + j].
cudaError_t scatter_patches(const void* matrix, void* image, const PatchChunk& chunk,
                            int element_size, cudaStream_t stream);

}  // namespace l2p::cuda
