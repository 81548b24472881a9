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
    @torch.library.register_fake("l2p::patch_embed")
    def _(x, weight, bias, patch_size):
        tokens = (x.shape[2] // patch_size) * (x.shape[3] // patch_size)
        return x.new_empty((x.shape[0], tokens, weight.shape[0]))

    @torch.library.register_fake("l2p::patch_weight_grad")
    def _(x, grad_tokens, patch_size):
        return x.new_empty((grad_tokens.shape[2], x.shape[1], patch_size, patch_size))


if _extension.is_compiled():
    _register_fake_kernels()
