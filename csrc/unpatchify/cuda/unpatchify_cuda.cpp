// Un-patchify on the GPU. On Hopper, bfloat16 / float16 with a power-of-two patch can run as one
// CUTLASS GEMM whose epilogue writes the image (unpatchify_gemm_sm90.cu; L2P_UNPATCHIFY_FUSED=1).
// Otherwise each chunk of tokens is projected by cuBLAS on the current stream (bias folded into
// the GEMM) into a bounded scratch matrix, which one kernel folds into the image
// (common/cuda/patch_copy.cu). Either way the (B, N, C*p*p) projection is never materialised.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "common/cuda/patch_chunks.h"
#include "common/cuda/switches.h"
#include "common/patch_checks.h"
#include "unpatchify/cuda/fused_default.h"
#ifdef L2P_WITH_CUTLASS
#include "unpatchify/cuda/unpatchify_gemm_sm90.h"
#endif

namespace l2p::cuda {
namespace {

#ifdef L2P_WITH_CUTLASS
// L2P_UNPATCHIFY_FUSED_SCHEDULE=pingpong picks the other mainloop schedule (default
// cooperative), so that a GPU pass can time both (bench/gpu/unpatchify_ab.py).
FusedUnpatchifySchedule fused_schedule() {
  return env_is("L2P_UNPATCHIFY_FUSED_SCHEDULE", "pingpong") ? FusedUnpatchifySchedule::kPingpong
                                                            : FusedUnpatchifySchedule::kCooperative;
}
#endif

// The fused Hopper kernel, where it takes the problem; false leaves `image` to the general path.
bool try_fused_unpatchify(const at::Tensor& tokens, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t patch_size,
                          at::Tensor& image) {
#ifdef L2P_WITH_CUTLASS
  const auto dtype = tokens.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) ||
      !switched("L2P_UNPATCHIFY_FUSED", kFusedUnpatchifyByDefault)) {
    return false;
  }
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const FusedUnpatchify problem{tokens.const_data_ptr(),
                                w.const_data_ptr(),
                                b.has_value() ? b->const_data_ptr() : nullptr,
                                image.data_ptr(),
                                image.size(0),
                                image.size(1),
                                image.size(2),
                                image.size(3),
                                patch_size,
                                tokens.size(2),
                                dtype == at::kHalf,
                                fused_schedule()};
  if (!fused_unpatchify_supported(problem)) return false;
  const size_t workspace_bytes = fused_unpatchify_workspace_bytes(problem);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, tokens.options().dtype(at::kByte));
  C10_CUDA_CHECK(fused_unpatchify(problem, workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                                  c10::cuda::getCurrentCUDAStream().stream()));
  return true;
#else
  return false;
#endif
}

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
  if (try_fused_unpatchify(tokens, weight, bias, p, image)) return image;
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
