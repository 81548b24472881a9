// Patch gather / scatter between an image batch and a chunk of the patch matrix. Both are
// pure permutations of bits, so one kernel serves every dtype: it moves "words" of up to
// 16 bytes (several pixels of one patch row at once) when the patch width and the pointers
// allow, and single elements otherwise.
#include "common/cuda/patch_copy.h"

#include <cstdint>

namespace l2p::cuda {
namespace {

struct CopyGeometry {
  uint32_t channels, height, width, patch;
  uint32_t patch_cols;      // W / p
  uint32_t image_tokens;    // (H / p) * (W / p)
  uint32_t first_image;     // image of the chunk's first token
  uint32_t first_in_image;  // that token's index inside its image
  uint32_t words_per_row;   // C*p*p / vec
  uint32_t vec;             // elements per word
  uint32_t total_words;     // count * words_per_row
};

// Word v of the chunk's row-major matrix is (token t = v / words_per_row, feature
// k = (v % words_per_row) * vec), and k = c*p*p + i*p + j names pixel (c, i, j) of the patch;
// vec divides p, so a word never crosses a patch row.
template <typename Word, bool kScatter>
__global__ void __launch_bounds__(256)
    patch_copy_kernel(const Word* __restrict__ src, Word* __restrict__ dst, CopyGeometry g) {
  const uint32_t pp = g.patch * g.patch;
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t v = blockIdx.x * blockDim.x + threadIdx.x; v < g.total_words; v += stride) {
    const uint32_t t = v / g.words_per_row;
    const uint32_t k = (v - t * g.words_per_row) * g.vec;
    const uint32_t c = k / pp;
    const uint32_t r = k - c * pp;
    const uint32_t i = r / g.patch;
    const uint32_t j = r - i * g.patch;
    const uint32_t local = g.first_in_image + t;  // < 2^32: both terms < 2^31
    const uint32_t b_off = local / g.image_tokens;
    const uint32_t n = local - b_off * g.image_tokens;
    const uint32_t row = n / g.patch_cols;
    const uint32_t col = n - row * g.patch_cols;
    const int64_t plane = static_cast<int64_t>(g.first_image + b_off) * g.channels + c;
    const int64_t pixel = (plane * g.height + static_cast<int64_t>(row) * g.patch + i) * g.width +
                          static_cast<int64_t>(col) * g.patch + j;
    const int64_t image_word = pixel / g.vec;
    if constexpr (kScatter) {
      dst[image_word] = src[v];
    } else {
      dst[v] = src[image_word];
    }
  }
}

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <bool kScatter>
cudaError_t launch_patch_copy(const void* src, void* dst, const PatchChunk& chunk,
                              int element_size, cudaStream_t stream) {
  if (chunk.count <= 0) return cudaSuccess;
  if (element_size != 2 && element_size != 4 && element_size != 8) return cudaErrorInvalidValue;
  const int64_t p = chunk.patch;
  const int64_t features = chunk.channels * p * p;
  const int64_t image_tokens = (chunk.height / p) * (chunk.width / p);
  const int64_t first_image = chunk.first_token / image_tokens;
  // Everything indexed in 32 bits must fit; the callers' chunks are far below these limits.
  if (chunk.count * features >= (int64_t{1} << 31) || image_tokens >= (int64_t{1} << 31) ||
      first_image >= (int64_t{1} << 31) || chunk.height >= (int64_t{1} << 31) ||
      chunk.width >= (int64_t{1} << 31) || chunk.channels >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  // The widest word (16, 8, 4, 2 bytes) that divides a patch row and both base pointers.
  int word = 16;
  while (word > element_size &&
         ((p * element_size) % word != 0 || !aligned(src, word) || !aligned(dst, word))) {
    word /= 2;
  }
  CopyGeometry g;
  g.channels = static_cast<uint32_t>(chunk.channels);
  g.height = static_cast<uint32_t>(chunk.height);
  g.width = static_cast<uint32_t>(chunk.width);
  g.patch = static_cast<uint32_t>(p);
  g.patch_cols = static_cast<uint32_t>(chunk.width / p);
  g.image_tokens = static_cast<uint32_t>(image_tokens);
  g.first_image = static_cast<uint32_t>(first_image);
  g.first_in_image = static_cast<uint32_t>(chunk.first_token - first_image * image_tokens);
  g.vec = static_cast<uint32_t>(word / element_size);
  g.words_per_row = static_cast<uint32_t>(features / g.vec);
  g.total_words = static_cast<uint32_t>(chunk.count * g.words_per_row);
  const unsigned threads = 256;
  const unsigned blocks = (g.total_words + threads - 1) / threads;
  switch (word) {
    case 16:
      patch_copy_kernel<uint4, kScatter><<<blocks, threads, 0, stream>>>(
          static_cast<const uint4*>(src), static_cast<uint4*>(dst), g);
      break;
    case 8:
      patch_copy_kernel<uint2, kScatter><<<blocks, threads, 0, stream>>>(
          static_cast<const uint2*>(src), static_cast<uint2*>(dst), g);
      break;
    case 4:
      patch_copy_kernel<uint32_t, kScatter><<<blocks, threads, 0, stream>>>(
          static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), g);
      break;
    default:
      patch_copy_kernel<uint16_t, kScatter><<<blocks, threads, 0, stream>>>(
          static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), g);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_patches(const void* image, void* matrix, const PatchChunk& chunk,
                           int element_size, cudaStream_t stream) {
  return launch_patch_copy<false>(image, matrix, chunk, element_size, stream);
}

cudaError_t scatter_patches(const void* matrix, void* image, const PatchChunk& chunk,
                            int element_size, cudaStream_t stream) {
  return launch_patch_copy<true>(matrix, image, chunk, element_size, stream);
}

}  // namespace l2p::cuda
