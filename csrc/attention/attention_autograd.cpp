// Autograd of l2p::attention_forward, in C++ so that a call pays no Python on its way to the
// kernel. The forward saves its output and logsumexp; the backward recomputes the attention
// weights from them (l2p::attention_backward). The logsumexp is an auxiliary output: it takes
// no gradient.
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/l2p_ops.h"

namespace l2p {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
                               double scale) {
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, lse) = ops::attention_forward(q, k, v, attn_mask, scale);
    }
    ctx->saved_data["scale"] = scale;
    // An undefined tensor stands for "no mask" among the saved ones.
    ctx->save_for_backward({q, k, v, out, lse, attn_mask.value_or(at::Tensor())});
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // SDPA's fused CPU and CUDA kernels have no second derivative either; its math one has.
    ops::refuse_double_backward(
        "attention", " inside torch.nn.attention.sdpa_kernel(SDPBackend.MATH)");
    const variable_list saved = ctx->get_saved_variables();
    std::optional<at::Tensor> attn_mask;
    if (saved[5].defined()) attn_mask = saved[5];
    auto [dq, dk, dv] = ops::attention_backward(grads[0], saved[0], saved[1], saved[2], saved[3],
                                                saved[4], attn_mask,
                                                ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double scale) {
  variable_list outputs = AttentionFunction::apply(q, k, v, attn_mask, scale);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, Autograd, m) {
  m.impl("attention_forward", &attention_forward_autograd);
}

}  // namespace l2p
