// Un-patchify on the GPU: each chunk of tokens is projected by cuBLAS on the current stream
// (bias folded into the GEMM) into a bounded scratch matrix, which one kernel folds into the
// image (common/cuda/patch_copy.cu). The (B, N, C*p*p) projection is never materialised.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda/patch_chunks.h"
#include "common/patch_checks.h"

namespace l2p::cuda {
namespace {

at::Tensor unpatchify_cuda(const at::Tensor& tokens_in, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t patch_size,
                           int64_t height, int64_t width) {
  check_unpatchify_args(tokens_in, weight, bias, patch_size, height, width);
  const int64_t p = patch_size, K = weight.size(0), C = K / (p * p);
  const int64_t N = (height / p) * (width / p);
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
