"""``l2p.ops.patch_embed``: pixel patches -> tokens, fused (no im2col copy of the image)."""

from __future__ import annotations

import torch

from l2p.ops import _checks, _dispatch, _extension
from l2p.ops.reference import patch_embed_reference


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    patch_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Embed the non-overlapping ``patch_size`` x ``patch_size`` patches of ``x``.

    Args:
        x: image batch (B, C, H, W); H and W multiples of ``patch_size``.
        weight: (D, C, p, p), laid out exactly as ``nn.Conv2d`` stores it, so the weights of
            a diffusers ``PatchEmbed`` projection work unchanged.
        bias: optional (D,).
        backend: "auto" (fastest measured path), "cpp", "cuda" or "torch".

    Returns:
        Tokens (B, (H/p)*(W/p), D), row-major over the patch grid; equal to
        ``F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)``.
    """
    _checks.require_input("x", x, 4, "(B, C, H, W)")
    # The weight's dtype must be x's (checked below), so a floating one.
    _checks.require_input("weight", weight, 4, "(D, C, p, p)", floating=False)
    if bias is not None:
        _checks.require_input("bias", bias, 1, "(D,)", floating=False)
    x, weight, bias = _checks.autocast(x, weight, bias)
    p = _checks.require_patch_size(patch_size)
    _checks.require_same("x", x, weight=weight, bias=bias)
    _, channels, height, width = x.shape
    if weight.shape[1:] != (channels, p, p):
        raise ValueError(
            f"weight must be (D, {channels}, {p}, {p}) for a {channels}-channel image and "
            f"patch_size {p}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    _checks.require_divisible(height, width, p)
    chosen = _dispatch.resolve("patch_embed", backend, x.device, x.dtype)
    if chosen == "torch":
        return patch_embed_reference(x, weight, bias, p)
    return torch.ops.l2p.patch_embed(x, weight, bias, p)


def _register_fake_kernels() -> None:
    """Shape-only kernels for torch.compile and FakeTensor; the autograd is C++
    (csrc/patch_embed/patch_embed_autograd.cpp)."""
    # The checks mirror csrc/common/patch_checks.h, so that FakeTensor and torch.compile
    # refuse what the real kernels refuse instead of tracing a shape for it.
    @torch.library.register_fake("l2p::patch_embed")
    def _(x, weight, bias, patch_size):
        _check_image(x, patch_size)
        torch._check_value(
            weight.dim() == 4, lambda: f"l2p: patch_embed weight must be 4-D, got {weight.shape}")
        for dim, want in ((1, x.shape[1]), (2, patch_size), (3, patch_size)):
            torch._check_value(
                weight.shape[dim] == want,
                lambda: f"l2p: patch_embed weight must be (D, {x.shape[1]}, {patch_size}, "
                        f"{patch_size}), got {tuple(weight.shape)}")
        torch._check_value(weight.shape[0] > 0,
                           lambda: "l2p: patch_embed weight has no output features")
        if bias is not None:
            torch._check_value(bias.dim() == 1, lambda: f"l2p: bias must be 1-D, got {bias.shape}")
            torch._check_value(bias.shape[0] == weight.shape[0],
                               lambda: f"l2p: bias must be ({weight.shape[0]}), got {bias.shape}")
        tokens = (x.shape[2] // patch_size) * (x.shape[3] // patch_size)
        return x.new_empty((x.shape[0], tokens, weight.shape[0]))

    @torch.library.register_fake("l2p::patch_weight_grad")
    def _(x, grad_tokens, patch_size):
        _check_image(x, patch_size)
        tokens = (x.shape[2] // patch_size) * (x.shape[3] // patch_size)
        torch._check_value(grad_tokens.dim() == 3,
                           lambda: f"l2p: grad_tokens must be (B, N, D), got {grad_tokens.shape}")
        for dim, want in ((0, x.shape[0]), (1, tokens)):
            torch._check_value(grad_tokens.shape[dim] == want,
                               lambda: f"l2p: grad_tokens must be ({x.shape[0]}, {tokens}, D), "
                                       f"got {tuple(grad_tokens.shape)}")
        return x.new_empty((grad_tokens.shape[2], x.shape[1], patch_size, patch_size))


def _check_patch_size(patch_size: int) -> None:
    torch._check_value(patch_size > 0,
                       lambda: f"l2p: patch_size must be positive, got {patch_size}")
    torch._check_value(patch_size * patch_size < 2**63,
                       lambda: f"l2p: patch_size {patch_size} is too large (patch_size**2 "
                               "overflows int64); use a patch size no larger than the image")


def _check_image(x: torch.Tensor, patch_size: int) -> None:
    """The fake-kernel form of check_image in csrc/common/patch_checks.h."""
    torch._check_value(x.dim() == 4, lambda: f"l2p: x must be (B, C, H, W), got shape {x.shape}")
    _check_patch_size(patch_size)
    torch._check_value(x.shape[2] % patch_size == 0,
                       lambda: f"l2p: image size {x.shape[2]}x{x.shape[3]} is not a multiple of "
                               f"patch_size {patch_size}")
    torch._check_value(x.shape[3] % patch_size == 0,
                       lambda: f"l2p: image size {x.shape[2]}x{x.shape[3]} is not a multiple of "
                               f"patch_size {patch_size}")
    torch._check_value(x.shape[1] > 0, lambda: "l2p: x has no channels")


if _extension.is_compiled():
    _register_fake_kernels()
