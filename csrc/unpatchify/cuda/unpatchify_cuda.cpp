// Un-patchify on the GPU: each chunk of tokens is projected by cuBLAS on the current stream
// (bias folded into the GEMM) into a bounded scratch matrix, which one kernel folds into the
// image (common/cuda/patch_copy.cu). The (B, N, C*p*p) projection is never materialised.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda/patch_chunks.h"

namespace l2p::cuda {
namespace {

at::Tensor unpatchify_cuda(const at::Tensor& tokens_in, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t patch_size,
                           int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(tokens_in.dim() == 3 && tokens_in.size(2) > 0,
                    "l2p: tokens must be (B, N, D) with D > 0, got ", tokens_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(tokens_in.scalar_type()),
                   "l2p: tokens must be floating point, got ", tokens_in.scalar_type());
  TORCH_CHECK_VALUE(patch_size > 0, "l2p: patch_size must be positive, got ", patch_size);
  TORCH_CHECK_VALUE(height > 0 && width > 0 && height % patch_size == 0 &&
                        width % patch_size == 0,
                    "l2p: image size ", height, "x", width,
                    " must be positive multiples of patch_size ", patch_size);
  const int64_t p = patch_size, pp = p * p;
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == tokens_in.size(2) &&
                        weight.size(0) % pp == 0 && weight.size(0) > 0,
                    "l2p: unpatchify weight must be (C*", pp, ", ", tokens_in.size(2),
                    "), got ", weight.sizes());
  const int64_t K = weight.size(0), C = K / pp, N = (height / p) * (width / p);
  TORCH_CHECK_VALUE(tokens_in.size(1) == N, "l2p: ", tokens_in.size(1), " tokens cannot fill a ",
                    height, "x", width, " image with patch_size ", p, " (needs ", N, ")");
  TORCH_CHECK_TYPE(weight.scalar_type() == tokens_in.scalar_type(),
                   "l2p: unpatchify weight dtype differs from tokens dtype");
  check_on_gpu(weight, tokens_in, "weight", "tokens");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == K, "l2p: bias must be (", K, ")");
    TORCH_CHECK_TYPE(bias->scalar_type() == tokens_in.scalar_type(), "l2p: bias dtype differs");
    check_on_gpu(*bias, tokens_in, "bias", "tokens");
  }
  const c10::cuda::OptionalCUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t B = tokens.size(0), D = tokens.size(2), total = B * N;
  at::Tensor image = at::empty({B, C, height, width}, tokens.options());
  if (image.numel() == 0) return image;
  const at::Tensor token_rows = tokens.view({total, D});
  const at::Tensor weight_t = weight.t();  // (D, K): cuBLAS reads the Linear weight transposed
  const int64_t T = chunk_tokens(total, K);
  at::Tensor features = at::empty({T, K}, tokens.options());
  for (int64_t first = 0; first < total; first += T) {
    const int64_t count = std::min(T, total - first);
    at::Tensor f = features.narrow(0, 0, count);
    const at::Tensor a = token_rows.narrow(0, first, count);
    if (bias.has_value()) {
      at::addmm_out(f, *bias, a, weight_t);
    } else {
      at::mm_out(f, a, weight_t);
    }
    scatter_chunk(features, image, PatchChunk{C, height, width, p, first, count});
  }
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, CUDA, m) { m.impl("unpatchify", &unpatchify_cuda); }

}  // namespace l2p::cuda
