// Argument checks of the patch ops, shared by the CPU and CUDA kernels: one contract, so a
// direct torch.ops call is refused with the same message on every device. (The Python fronts
// in python/l2p/ops check the same things first, with fuller messages.)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include "common/patches.h"

namespace l2p {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "l2p: ", name,
                   " must be floating point, got ", t.scalar_type());
}

inline void check_same_dtype_and_device(const at::Tensor& t, const at::Tensor& reference,
                                        const char* name, const char* reference_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == reference.scalar_type(), "l2p: ", name, " dtype ",
                   t.scalar_type(), " differs from ", reference_name, " dtype ",
                   reference.scalar_type());
  TORCH_CHECK_VALUE(t.device() == reference.device(), "l2p: ", name, " is on ", t.device(),
                    " but ", reference_name, " is on ", reference.device());
}

// p > 0 and p*p representable: the kernels size and index patches by p*p (and C*p*p), and a
// square that wraps (p = 2^32 gives 0) would reach a division by zero or a wild index.
inline int64_t check_patch_size(int64_t p) {
  TORCH_CHECK_VALUE(p > 0, "l2p: patch_size must be positive, got ", p);
  int64_t pp = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(p, p, &pp), "l2p: patch_size ", p,
                    " is too large (patch_size**2 overflows int64); use a patch size no larger "
                    "than the image");
  return pp;
}

// x: (B, C, H, W) with C > 0 and H, W multiples of p.
inline PatchGeometry check_image(const at::Tensor& x, int64_t p, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, "l2p: ", name, " must be (B, C, H, W), got shape ", x.sizes());
  const int64_t pp = check_patch_size(p);
  int64_t features = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(x.size(1), pp, &features), "l2p: ", name, " has ",
                    x.size(1), " channels of patch_size ", p,
                    ": channels * patch_size**2 overflows int64; use a smaller patch size");
  TORCH_CHECK_VALUE(x.size(2) % p == 0 && x.size(3) % p == 0, "l2p: image size ", x.size(2),
                    "x", x.size(3), " is not a multiple of patch_size ", p);
  TORCH_CHECK_VALUE(x.size(1) > 0, "l2p: ", name, " has no channels");
  check_floating(x, name);
  return PatchGeometry{x.size(1), x.size(2), x.size(3), p};
}

inline void check_bias(const c10::optional<at::Tensor>& bias, int64_t features,
                       const at::Tensor& reference, const char* reference_name) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == features, "l2p: bias must be (",
                    features, "), got ", bias->sizes());
  check_same_dtype_and_device(*bias, reference, "bias", reference_name);
}

// patch_embed(x (B,C,H,W), weight (D,C,p,p), bias (D)?)
inline PatchGeometry check_patch_embed_args(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, int64_t p) {
  const PatchGeometry g = check_image(x, p, "x");
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == g.channels && weight.size(2) == p &&
                        weight.size(3) == p,
                    "l2p: patch_embed weight must be (D, ", g.channels, ", ", p, ", ", p,
                    "), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, "l2p: patch_embed weight has no output features");
  check_same_dtype_and_device(weight, x, "weight", "x");
  check_bias(bias, weight.size(0), x, "x");
  return g;
}

// patch_weight_grad(x (B,C,H,W), grad_tokens (B,N,D))
inline PatchGeometry check_patch_weight_grad_args(const at::Tensor& x,
                                                  const at::Tensor& grad_tokens, int64_t p) {
  const PatchGeometry g = check_image(x, p, "x");
  TORCH_CHECK_VALUE(grad_tokens.dim() == 3 && grad_tokens.size(0) == x.size(0) &&
                        grad_tokens.size(1) == g.tokens(),
                    "l2p: grad_tokens must be (", x.size(0), ", ", g.tokens(), ", D), got ",
                    grad_tokens.sizes());
  check_same_dtype_and_device(grad_tokens, x, "grad_tokens", "x");
  return g;
}

// unpatchify(tokens (B,N,D), weight (C*p*p,D), bias (C*p*p)?, p, height, width)
inline PatchGeometry check_unpatchify_args(const at::Tensor& tokens, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t p,
                                           int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(tokens.dim() == 3 && tokens.size(2) > 0,
                    "l2p: tokens must be (B, N, D) with D > 0, got ", tokens.sizes());
  check_floating(tokens, "tokens");
  const int64_t pp = check_patch_size(p);
  TORCH_CHECK_VALUE(height > 0 && width > 0 && height % p == 0 && width % p == 0,
                    "l2p: image size ", height, "x", width,
                    " must be positive multiples of patch_size ", p);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == tokens.size(2) &&
                        weight.size(0) % pp == 0 && weight.size(0) > 0,
                    "l2p: unpatchify weight must be (C*", pp, ", ", tokens.size(2), "), got ",
                    weight.sizes());
  const PatchGeometry g{weight.size(0) / pp, height, width, p};
  TORCH_CHECK_VALUE(tokens.size(1) == g.tokens(), "l2p: ", tokens.size(1),
                    " tokens cannot fill a ", height, "x", width, " image with patch_size ", p,
                    " (needs ", g.tokens(), ")");
  check_same_dtype_and_device(weight, tokens, "weight", "tokens");
  check_bias(bias, weight.size(0), tokens, "tokens");
  return g;
}

}  // namespace l2p
