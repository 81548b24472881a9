// The l2p operator library: one schema per op. Kernels register per device in
// csrc/<op>/{cpu,cuda}/, autograd in csrc/<op>/<op>_autograd.cpp; Python adds the fake (shape)
// kernels in python/l2p/ops/.
#include <torch/library.h>

TORCH_LIBRARY(l2p, m) {
  // x (B,C,H,W), weight (D,C,p,p) as Conv2d stores it -> tokens (B,(H/p)*(W/p),D).
  m.def("patch_embed(Tensor x, Tensor weight, Tensor? bias, int patch_size) -> Tensor");
  // tokens (B,N,D), weight (C*p*p,D) as Linear stores it -> image (B,C,H,W);
  // feature c*p*p + i*p + j lands on pixel (c, row*p + i, col*p + j) of its patch.
  m.def(
      "unpatchify(Tensor tokens, Tensor weight, Tensor? bias, int patch_size, int height, "
      "int width) -> Tensor");
  // sum over batch and patches of grad_tokens[b,n,d] * patch(x)[b,n,c,i,j] -> (D,C,p,p):
  // the weight gradient of patch_embed, and (transposed) of unpatchify.
  m.def("patch_weight_grad(Tensor x, Tensor grad_tokens, int patch_size) -> Tensor");
  // q (B,Hq,Nq,Dh), k/v (B,Hk,Nk,Dh[v]) with Hq % Hk == 0; attn_mask: float32 additive
  // (float64 for float64 inputs on the CPU), already expanded to (B,Hq,Nq,Nk) (zero strides
  // allowed). Returns out and the
  // logsumexp (B,Hq,Nq) in float32 (-inf for a row that attends to nothing).
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? attn_mask, float scale) -> (Tensor, Tensor, Tensor)");
}
