// Autograd of l2p::patch_embed, in C++ so that a call pays no Python on its way to the kernel
// (the op runs once per image in a pixel model, where a few microseconds of host work show).
// The input gradient of a patch embedding is an un-patchify by the transposed weight, so both
// directions run on the fused kernels of the inputs' device.
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/l2p_ops.h"

namespace l2p {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class PatchEmbedFunction : public torch::autograd::Function<PatchEmbedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t patch_size) {
    ctx->saved_data["patch_size"] = patch_size;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({x, weight});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::patch_embed(x, weight, bias, patch_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ops::refuse_double_backward("patch_embed");
    const at::Tensor& grad = grads[0];  // (B, N, D)
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t p = ctx->saved_data["patch_size"].toInt();
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor adjoint = weight.reshape({weight.size(0), -1}).t();
      grad_x = ops::unpatchify(grad, adjoint, std::nullopt, p, x.size(2), x.size(3));
    }
    if (ctx->needs_input_grad(1)) grad_w = ops::patch_weight_grad(x, grad, p);
    // The bias is the third graph input only when one was passed.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_b = grad.sum(at::IntArrayRef{0, 1});
    }
    return {grad_x, grad_w, grad_b, at::Tensor()};
  }
};

at::Tensor patch_embed_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t patch_size) {
  return PatchEmbedFunction::apply(x, weight, bias, patch_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, Autograd, m) { m.impl("patch_embed", &patch_embed_autograd); }

}  // namespace l2p
