// Autograd of l2p::unpatchify, in C++ so that a call pays no Python on its way to the kernel.
// The adjoint of the fold is a patch embedding of the image gradient by the transposed weight,
// and the weight gradient the same patch outer product as patch_embed's.
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/l2p_ops.h"

namespace l2p {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class UnpatchifyFunction : public torch::autograd::Function<UnpatchifyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& tokens,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t patch_size, int64_t height, int64_t width) {
    ctx->saved_data["patch_size"] = patch_size;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({tokens, weight});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::unpatchify(tokens, weight, bias, patch_size, height, width);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ops::refuse_double_backward("unpatchify");
    const at::Tensor& grad = grads[0];  // (B, C, H, W)
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& tokens = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t p = ctx->saved_data["patch_size"].toInt();
    const int64_t dim = tokens.size(2);
    const int64_t channels = weight.size(0) / (p * p);
    at::Tensor grad_tokens, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor adjoint = weight.t().reshape({dim, channels, p, p});
      grad_tokens = ops::patch_embed(grad, adjoint, std::nullopt, p);
    }
    if (ctx->needs_input_grad(1)) {
      grad_w = ops::patch_weight_grad(grad, tokens, p).reshape({dim, -1}).t();
    }
    // The bias is the third graph input only when one was passed.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      const int64_t b = grad.size(0), h = grad.size(2), w = grad.size(3);
      grad_b = grad.reshape({b, channels, h / p, p, w / p, p}).sum(at::IntArrayRef{0, 2, 4}).reshape({-1});
    }
    return {grad_tokens, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor unpatchify_autograd(const at::Tensor& tokens, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t patch_size,
                               int64_t height, int64_t width) {
  return UnpatchifyFunction::apply(tokens, weight, bias, patch_size, height, width);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, Autograd, m) { m.impl("unpatchify", &unpatchify_autograd); }

}  // namespace l2p
