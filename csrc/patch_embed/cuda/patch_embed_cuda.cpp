// Patch embedding on the GPU: chunks of tokens are gathered into a bounded patch matrix
// (common/cuda/patch_copy.cu) and projected by cuBLAS on the current stream, the bias
// folded into the GEMM (addmm). The image is never unfolded as a whole.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda/patch_chunks.h"
#include "common/patch_checks.h"

namespace l2p::cuda {
namespace {

at::Tensor patch_embed_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, int64_t patch_size) {
  check_patch_embed_args(x_in, weight, bias, patch_size);
  const int64_t C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), p = patch_size;
  const int64_t D = weight.size(0);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), K = C * p * p, N = (H / p) * (W / p), total = B * N;
  at::Tensor out = at::empty({B, N, D}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor out_rows = out.view({total, D});
  const at::Tensor weight_t = weight.reshape({D, K}).t();  // (K, D): cuBLAS reads it transposed
  const int64_t T = chunk_tokens(total, K);
  at::Tensor patches = at::empty({T, K}, x.options());
  for (int64_t first = 0; first < total; first += T) {
    const int64_t count = std::min(T, total - first);
    gather_chunk(x, patches, PatchChunk{C, H, W, p, first, count});
    const at::Tensor a = patches.narrow(0, 0, count);
    at::Tensor rows = out_rows.narrow(0, first, count);
    if (bias.has_value()) {
      at::addmm_out(rows, *bias, a, weight_t);
    } else {
      at::mm_out(rows, a, weight_t);
    }
  }
  return out;
}

// grad_weight (D, K) = grad_tokens^T @ patches, summed over chunks. Half-precision chunks are
// multiplied by cuBLAS (fp32 accumulation inside) and summed across chunks in fp32.
at::Tensor patch_weight_grad_cuda(const at::Tensor& x_in, const at::Tensor& grad_tokens,
                                  int64_t patch_size) {
  check_patch_weight_grad_args(x_in, grad_tokens, patch_size);
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t p = patch_size, K = C * p * p, N = (H / p) * (W / p), total = B * N;
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const int64_t D = grad_tokens.size(2);
  if (D == 0 || total == 0) return at::zeros({D, C, p, p}, x_in.options());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_rows = grad_tokens.contiguous().view({total, D});
  const int64_t T = chunk_tokens(total, K);
  at::Tensor patches = at::empty({T, K}, x.options());
  if (T >= total) {
    gather_chunk(x, patches, PatchChunk{C, H, W, p, 0, total});
    return at::mm(grad_rows.t(), patches).view({D, C, p, p});
  }
  const bool exact = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  at::Tensor acc = at::zeros({D, K}, x.options().dtype(exact ? x.scalar_type() : at::kFloat));
  for (int64_t first = 0; first < total; first += T) {
    const int64_t count = std::min(T, total - first);
    gather_chunk(x, patches, PatchChunk{C, H, W, p, first, count});
    const at::Tensor a = patches.narrow(0, 0, count);
    const at::Tensor g = grad_rows.narrow(0, first, count).t();
    if (exact) {
      acc.addmm_(g, a);
    } else {
      acc.add_(at::mm(g, a));
    }
  }
  return acc.to(x.scalar_type()).view({D, C, p, p});
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, CUDA, m) {
  m.impl("patch_embed", &patch_embed_cuda);
  m.impl("patch_weight_grad", &patch_weight_grad_cuda);
}

}  // namespace l2p::cuda
