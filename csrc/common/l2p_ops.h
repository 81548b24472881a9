// Typed calls of the l2p operators through the dispatcher, for code that runs one op from
// another (the autograd kernels): each call reaches the kernel of its inputs' device. A graph of
// a backward (create_graph) is refused: see refuse_double_backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace l2p::ops {

// Grad mode is on inside a backward exactly when autograd builds a graph of the gradient
// (create_graph=True). The kernels this backward calls (patch_weight_grad, attention_backward)
// have no autograd of their own, so such a graph would hold silently wrong second derivatives:
// refuse it and point to the torch path, which differentiates twice.
inline void refuse_double_backward(const char* op, const char* hint = "") {
  TORCH_CHECK(!at::GradMode::is_enabled(), "l2p: second derivatives through l2p.ops.", op,
              " are not supported; call it with backend='torch'", hint);
}

inline at::Tensor patch_embed(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t patch_size) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("l2p::patch_embed", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t)>();
  return op.call(x, weight, bias, patch_size);
}

inline at::Tensor unpatchify(const at::Tensor& tokens, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t patch_size,
                             int64_t height, int64_t width) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("l2p::unpatchify", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t, int64_t, int64_t)>();
  return op.call(tokens, weight, bias, patch_size, height, width);
}

inline at::Tensor patch_weight_grad(const at::Tensor& x, const at::Tensor& grad_tokens,
                                    int64_t patch_size) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("l2p::patch_weight_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, grad_tokens, patch_size);
}

inline std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("l2p::attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double)>();
  return op.call(q, k, v, attn_mask, scale);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("l2p::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double)>();
  return op.call(grad_out, q, k, v, out, lse, attn_mask, scale);
}

}  // namespace l2p::ops
