// Fused un-patchify on the CPU: each worker projects a tile of tokens to pixel features in
// a small buffer and scatters it straight into the image; the (B, N, C*p*p) projection is
// never materialised.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_gemm.h"
#include "common/patch_checks.h"
#include "common/patches.h"

namespace l2p::cpu {
namespace {

template <typename scalar_t>
void unpatchify_kernel(const at::Tensor& tokens, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const PatchGeometry& g,
                       at::Tensor& image) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = tokens.size(0), N = tokens.size(1), D = tokens.size(2);
  const int64_t K = g.features();
  const at::Tensor w = as_acc<acc_t>(weight);
  const at::Tensor b = bias.has_value() ? as_acc<acc_t>(*bias) : at::Tensor();
  const acc_t* w_ptr = w.data_ptr<acc_t>();
  const acc_t* b_ptr = b.defined() ? b.data_ptr<acc_t>() : nullptr;
  const scalar_t* tok_ptr = tokens.data_ptr<scalar_t>();
  scalar_t* img_ptr = image.data_ptr<scalar_t>();
  const int64_t T = tile_tokens(g, B, sizeof(acc_t), at::get_num_threads());
  const int64_t num_tiles = B * tiles_per_image(g, T);
  const int64_t image_numel = g.channels * g.height * g.width;

  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> features(T * K);
    std::vector<acc_t> converted(std::is_same_v<acc_t, scalar_t> ? 0 : T * D);
    for (int64_t index = begin; index < end; ++index) {
      const PatchTile tile = tile_at(g, T, index);
      const int64_t first = tile.b * N + tile.first;
      const acc_t* src = nullptr;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        src = tok_ptr + first * D;
      } else {
        const scalar_t* s = tok_ptr + first * D;
        for (int64_t e = 0; e < tile.count * D; ++e) converted[e] = static_cast<acc_t>(s[e]);
        src = converted.data();
      }
      gemm(false, true, tile.count, K, D, acc_t(1), src, D, w_ptr, D, acc_t(0),
           features.data(), K);
      scatter_patches(features.data(), b_ptr, g, tile, img_ptr + tile.b * image_numel);
    }
  });
}

at::Tensor unpatchify_cpu(const at::Tensor& tokens_in, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t patch_size,
                          int64_t height, int64_t width) {
  const PatchGeometry g =
      check_unpatchify_args(tokens_in, weight, bias, patch_size, height, width);
  const at::Tensor tokens = tokens_in.contiguous();
  at::Tensor image = at::empty({tokens.size(0), g.channels, height, width}, tokens.options());
  if (image.numel() == 0) return image;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, tokens.scalar_type(), "unpatchify_cpu",
      [&] { unpatchify_kernel<scalar_t>(tokens, weight, bias, g, image); });
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, CPU, m) { m.impl("unpatchify", &unpatchify_cpu); }

}  // namespace l2p::cpu
