// Moving whole pixel patches between an image (C,H,W) and a row-major patch matrix whose
// rows are patches and whose columns are ordered c*p*p + i*p + j (Conv2d's weight layout).
// Kernels work on "patch-row tiles": T consecutive patches of one row of patches, so every
// copy below is a run of p contiguous pixels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
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

// A tile: T patches starting at (row, col0) of image b.
struct PatchTile {
  int64_t b, row, col0, count;
};

// Tiles of at most max_tokens patches, never crossing a patch row.
inline int64_t tiles_per_row(const PatchGeometry& g, int64_t max_tokens) {
  return (g.cols() + max_tokens - 1) / max_tokens;
}

inline PatchTile tile_at(const PatchGeometry& g, int64_t max_tokens, int64_t index) {
  const int64_t per_row = tiles_per_row(g, max_tokens);
  const int64_t per_image = per_row * g.rows();
  PatchTile t;
  t.b = index / per_image;
  const int64_t rem = index % per_image;
  t.row = rem / per_row;
  t.col0 = (rem % per_row) * max_tokens;
  t.count = std::min(max_tokens, g.cols() - t.col0);
  return t;
}

// A[t, c*p*p + i*p + j] = image[c, row*p + i, (col0 + t)*p + j] for t < tile.count.
template <typename src_t, typename dst_t>
inline void gather_patches(const src_t* image, const PatchGeometry& g, const PatchTile& tile,
                           dst_t* A) {
  const int64_t p = g.patch, K = g.features();
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t i = 0; i < p; ++i) {
      const src_t* src = image + (c * g.height + tile.row * p + i) * g.width + tile.col0 * p;
      dst_t* dst = A + c * p * p + i * p;
      for (int64_t t = 0; t < tile.count; ++t) {
        const src_t* s = src + t * p;
        dst_t* d = dst + t * K;
        for (int64_t j = 0; j < p; ++j) d[j] = static_cast<dst_t>(s[j]);
      }
    }
  }
}

// image[c, row*p + i, (col0 + t)*p + j] = A[t, c*p*p + i*p + j] (+ bias[c*p*p + i*p + j]).
template <typename src_t, typename dst_t>
inline void scatter_patches(const src_t* A, const src_t* bias, const PatchGeometry& g,
                            const PatchTile& tile, dst_t* image) {
  const int64_t p = g.patch, K = g.features();
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t i = 0; i < p; ++i) {
      dst_t* dst = image + (c * g.height + tile.row * p + i) * g.width + tile.col0 * p;
      const int64_t f0 = c * p * p + i * p;
      const src_t* src = A + f0;
      for (int64_t t = 0; t < tile.count; ++t) {
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
