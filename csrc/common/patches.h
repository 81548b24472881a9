// Moving whole pixel patches between an image (C,H,W) and a row-major patch matrix whose
// rows are patches and whose columns are ordered c*p*p + i*p + j (Conv2d's weight layout).
// Kernels work on tiles of consecutive tokens; every copy below is a run of p contiguous
// pixels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>

namespace l2p {

struct PatchGeometry {
  int64_t channels, height, width, patch;
  int64_t rows() const { return height / patch; }
  int64_t cols() const { return width / patch; }
  int64_t tokens() const { return rows() * cols(); }
  int64_t features() const { return channels * patch * patch; }
};

}  // namespace l2p

namespace l2p::cpu {

// A tile: `count` consecutive tokens of image b from token `first` on (row-major over the
// patch grid); it may span several rows of patches.
struct PatchTile {
  int64_t b, first, count;
};

// Tokens per tile: large enough for an efficient GEMM, small enough that the per-thread
// patch buffer (tokens x C*p*p) stays within a few MiB, and enough tiles to feed every thread.
inline int64_t tile_tokens(const PatchGeometry& g, int64_t batch, int64_t element_size,
                           int64_t threads) {
  constexpr int64_t kMaxTokens = 256, kMinTokens = 16, kBufferBytes = int64_t{4} << 20;
  const int64_t by_buffer = kBufferBytes / (g.features() * element_size);
  const int64_t by_threads = (batch * g.tokens() + 4 * threads - 1) / (4 * threads);
  const int64_t t = std::min({kMaxTokens, by_buffer, by_threads});
  return std::max<int64_t>(1, std::min(g.tokens(), std::max(kMinTokens, t)));
}

inline int64_t tiles_per_image(const PatchGeometry& g, int64_t tokens_per_tile) {
  return (g.tokens() + tokens_per_tile - 1) / tokens_per_tile;
}

inline PatchTile tile_at(const PatchGeometry& g, int64_t tokens_per_tile, int64_t index) {
  const int64_t per_image = tiles_per_image(g, tokens_per_tile);
  PatchTile t;
  t.b = index / per_image;
  t.first = (index % per_image) * tokens_per_tile;
  t.count = std::min(tokens_per_tile, g.tokens() - t.first);
  return t;
}

// Calls f(row, col0, seg, offset) for each run of tokens of the tile that lies in one row of
// patches: tokens (row, col0 .. col0 + seg), which are rows offset .. offset + seg of the tile.
template <typename F>
inline void for_each_row_segment(const PatchGeometry& g, const PatchTile& tile, F&& f) {
  int64_t n = tile.first;
  const int64_t end = tile.first + tile.count;
  while (n < end) {
    const int64_t row = n / g.cols(), col0 = n % g.cols();
    const int64_t seg = std::min(g.cols() - col0, end - n);
    f(row, col0, seg, n - tile.first);
    n += seg;
  }
}

// A[t, c*p*p + i*p + j] = image[c, row*p + i, col*p + j] for the tile's tokens t.
template <typename src_t, typename dst_t>
inline void gather_patches(const src_t* image, const PatchGeometry& g, const PatchTile& tile,
                           dst_t* A) {
  const int64_t p = g.patch, K = g.features();
  for_each_row_segment(g, tile, [&](int64_t row, int64_t col0, int64_t seg, int64_t offset) {
    for (int64_t c = 0; c < g.channels; ++c) {
      for (int64_t i = 0; i < p; ++i) {
        const src_t* src = image + (c * g.height + row * p + i) * g.width + col0 * p;
        dst_t* dst = A + offset * K + c * p * p + i * p;
        for (int64_t t = 0; t < seg; ++t) {
          const src_t* s = src + t * p;
          dst_t* d = dst + t * K;
          for (int64_t j = 0; j < p; ++j) d[j] = static_cast<dst_t>(s[j]);
        }
      }
    }
  });
}

// image[c, row*p + i, col*p + j] = A[t, c*p*p + i*p + j] (+ bias[c*p*p + i*p + j]).
template <typename src_t, typename dst_t>
inline void scatter_patches(const src_t* A, const src_t* bias, const PatchGeometry& g,
                            const PatchTile& tile, dst_t* image) {
  const int64_t p = g.patch, K = g.features();
  for_each_row_segment(g, tile, [&](int64_t row, int64_t col0, int64_t seg, int64_t offset) {
    for (int64_t c = 0; c < g.channels; ++c) {
      for (int64_t i = 0; i < p; ++i) {
        dst_t* dst = image + (c * g.height + row * p + i) * g.width + col0 * p;
        const int64_t f0 = c * p * p + i * p;
        const src_t* src = A + offset * K + f0;
        for (int64_t t = 0; t < seg; ++t) {
          const src_t* s = src + t * K;
          dst_t* d = dst + t * p;
          if (bias != nullptr) {
            for (int64_t j = 0; j < p; ++j) d[j] = static_cast<dst_t>(s[j] + bias[f0 + j]);
          } else {
            for (int64_t j = 0; j < p; ++j) d[j] = static_cast<dst_t>(s[j]);
          }
        }
      }
    }
  });
}

// Compute type of the CPU kernels: double for double, float for everything else.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A contiguous copy of t in the compute type (no copy when it already is).
template <typename acc_t>
inline at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

}  // namespace l2p::cpu
