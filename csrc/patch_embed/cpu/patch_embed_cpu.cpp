// Fused patch embedding on the CPU: each worker gathers a tile of patches into a small
// buffer and multiplies it by the projection; the image is never unfolded as a whole.
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
void patch_embed_kernel(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const PatchGeometry& g,
                        at::Tensor& out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = weight.size(0), K = g.features(), N = g.tokens();
  const at::Tensor w = as_acc<acc_t>(weight.reshape({D, K}));
  const at::Tensor b = bias.has_value() ? as_acc<acc_t>(*bias) : at::Tensor();
  const acc_t* w_ptr = w.data_ptr<acc_t>();
  const acc_t* b_ptr = b.defined() ? b.data_ptr<acc_t>() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t T = tile_tokens(g, x.size(0), sizeof(acc_t), at::get_num_threads());
  const int64_t num_tiles = x.size(0) * tiles_per_image(g, T);
  const int64_t image_numel = g.channels * g.height * g.width;

  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> patches(T * K);
    std::vector<acc_t> result(std::is_same_v<acc_t, scalar_t> ? 0 : T * D);
    for (int64_t index = begin; index < end; ++index) {
      const PatchTile tile = tile_at(g, T, index);
      gather_patches(x_ptr + tile.b * image_numel, g, tile, patches.data());
      const int64_t first = tile.b * N + tile.first;
      acc_t* dst = nullptr;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        dst = out_ptr + first * D;
      } else {
        dst = result.data();
      }
      acc_t beta = 0;
      if (b_ptr != nullptr) {
        for (int64_t t = 0; t < tile.count; ++t) std::copy(b_ptr, b_ptr + D, dst + t * D);
        beta = 1;
      }
      gemm(false, true, tile.count, D, K, acc_t(1), patches.data(), K, w_ptr, K, beta, dst, D);
      if constexpr (!std::is_same_v<acc_t, scalar_t>) {
        scalar_t* o = out_ptr + first * D;
        for (int64_t e = 0; e < tile.count * D; ++e) o[e] = static_cast<scalar_t>(dst[e]);
      }
    }
  });
}

at::Tensor patch_embed_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t patch_size) {
  const PatchGeometry g = check_patch_embed_args(x_in, weight, bias, patch_size);
  const int64_t D = weight.size(0);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), g.tokens(), D}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_cpu",
                                  [&] { patch_embed_kernel<scalar_t>(x, weight, bias, g, out); });
  return out;
}

// grad_weight[d, k] = sum over tiles of grad_tokens[tile, d]^T @ patches[tile, k]. Workers
// own disjoint slices of D, so no reduction across threads is needed.
template <typename scalar_t>
void patch_weight_grad_kernel(const at::Tensor& x, const at::Tensor& grad_tokens,
                              const PatchGeometry& g, at::Tensor& grad_w) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = grad_tokens.size(2), K = g.features(), N = g.tokens();
  const at::Tensor grad = as_acc<acc_t>(grad_tokens);
  const acc_t* g_ptr = grad.data_ptr<acc_t>();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  acc_t* w_ptr = grad_w.data_ptr<acc_t>();
  const int64_t T = tile_tokens(g, x.size(0), sizeof(acc_t), 1);
  const int64_t num_tiles = x.size(0) * tiles_per_image(g, T);
  const int64_t image_numel = g.channels * g.height * g.width;
  constexpr int64_t kRowsPerSlice = 64;
  const int64_t num_slices = (D + kRowsPerSlice - 1) / kRowsPerSlice;

  at::parallel_for(0, num_slices, 1, [&](int64_t begin, int64_t end) {
    const int64_t d0 = begin * kRowsPerSlice, d1 = std::min(D, end * kRowsPerSlice);
    std::vector<acc_t> patches(T * K);
    for (int64_t index = 0; index < num_tiles; ++index) {
      const PatchTile tile = tile_at(g, T, index);
      gather_patches(x_ptr + tile.b * image_numel, g, tile, patches.data());
      const int64_t first = tile.b * N + tile.first;
      gemm(true, false, d1 - d0, K, tile.count, acc_t(1), g_ptr + first * D + d0, D,
           patches.data(), K, acc_t(1), w_ptr + d0 * K, K);
    }
  });
}

at::Tensor patch_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& grad_tokens,
                                 int64_t patch_size) {
  const PatchGeometry g = check_patch_weight_grad_args(x_in, grad_tokens, patch_size);
  const at::Tensor x = x_in.contiguous();
  const int64_t D = grad_tokens.size(2);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "patch_weight_grad_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        at::Tensor grad_w = at::zeros({D, g.features()},
                                      x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        if (grad_w.numel() > 0 && grad_tokens.numel() > 0) {
          patch_weight_grad_kernel<scalar_t>(x, grad_tokens, g, grad_w);
        }
        result = grad_w.to(x.scalar_type())
                     .view({D, g.channels, patch_size, patch_size});
      });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("patch_weight_grad", &patch_weight_grad_cpu);
}

}  // namespace l2p::cpu
