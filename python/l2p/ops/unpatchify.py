"""``l2p.ops.unpatchify``: tokens -> Linear(D, C*p*p) -> image, fused projection + fold."""

from __future__ import annotations

import torch

from l2p.ops import _checks, _dispatch, _extension
from l2p.ops.patch_embed import _check_patch_size
from l2p.ops.reference import unpatchify_reference


def unpatchify(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    patch_size: int,
    height: int,
    width: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Project each token to a ``patch_size`` x ``patch_size`` pixel patch and fold the
    patches into an image.

    Args:
        tokens: (B, N, D) with N = (height/p) * (width/p), row-major over the patch grid.
        weight: (C*p*p, D), laid out as ``nn.Linear`` stores it; output feature
            c*p*p + i*p + j is pixel (c, i, j) of the patch (channel-major, the layout of a
            ``patch_embed`` weight).
        bias: optional (C*p*p,).
        backend: "auto" (fastest measured path), "cpp", "cuda" or "torch".

    Returns:
        Image (B, C, height, width).
    """
    _checks.require_input("tokens", tokens, 3, "(B, N, D)")
    # The weight's dtype must be the tokens' (checked below), so a floating one.
    _checks.require_input("weight", weight, 2, "(C*p*p, D)", floating=False)
    if bias is not None:
        _checks.require_input("bias", bias, 1, "(C*p*p,)", floating=False)
    tokens, weight, bias = _checks.autocast(tokens, weight, bias)
    p = _checks.require_patch_size(patch_size)
    _checks.require_same("tokens", tokens, weight=weight, bias=bias)
    height = _checks.require_positive_int("height", height)
    width = _checks.require_positive_int("width", width)
    _checks.require_divisible(height, width, p)
    if weight.shape[1] != tokens.shape[2]:
        raise ValueError(
            f"weight has {weight.shape[1]} input features but tokens have {tokens.shape[2]}"
        )
    if weight.shape[0] % (p * p):
        raise ValueError(
            f"weight has {weight.shape[0]} output features, not a multiple of "
            f"patch_size**2 = {p * p}; it must be (C*p*p, D)"
        )
    needed = (height // p) * (width // p)
    if tokens.shape[1] != needed:
        raise ValueError(
            f"{tokens.shape[1]} tokens cannot fill a {height}x{width} image with patch_size "
            f"{p}: it takes {needed}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    chosen = _dispatch.resolve("unpatchify", backend, tokens.device, tokens.dtype)
    if chosen == "torch":
        return unpatchify_reference(tokens, weight, bias, p, height, width)
    return torch.ops.l2p.unpatchify(tokens, weight, bias, p, height, width)


def _register_fake_kernels() -> None:
    """Shape-only kernels for torch.compile and FakeTensor; the autograd is C++
    (csrc/unpatchify/unpatchify_autograd.cpp)."""
    # The checks mirror check_unpatchify_args in csrc/common/patch_checks.h, so that
    # FakeTensor and torch.compile refuse what the real kernels refuse.
    @torch.library.register_fake("l2p::unpatchify")
    def _(tokens, weight, bias, patch_size, height, width):
        torch._check_value(tokens.dim() == 3,
                           lambda: f"l2p: tokens must be (B, N, D), got {tokens.shape}")
        torch._check_value(tokens.shape[2] > 0, lambda: "l2p: tokens must have D > 0")
        _check_patch_size(patch_size)
        for size in (height, width):
            torch._check_value(size > 0, lambda: f"l2p: image size {height}x{width} must be "
                                                 f"positive multiples of patch_size {patch_size}")
            torch._check_value(size % patch_size == 0,
                               lambda: f"l2p: image size {height}x{width} must be positive "
                                       f"multiples of patch_size {patch_size}")
        pp = patch_size * patch_size
        torch._check_value(weight.dim() == 2,
                           lambda: f"l2p: unpatchify weight must be 2-D, got {weight.shape}")
        torch._check_value(weight.shape[1] == tokens.shape[2],
                           lambda: f"l2p: unpatchify weight must be (C*{pp}, {tokens.shape[2]}), "
                                   f"got {tuple(weight.shape)}")
        torch._check_value(weight.shape[0] % pp == 0,
                           lambda: f"l2p: unpatchify weight must be (C*{pp}, {tokens.shape[2]}), "
                                   f"got {tuple(weight.shape)}")
        torch._check_value(weight.shape[0] > 0,
                           lambda: "l2p: unpatchify weight has no output features")
        needed = (height // patch_size) * (width // patch_size)
        torch._check_value(tokens.shape[1] == needed,
                           lambda: f"l2p: {tokens.shape[1]} tokens cannot fill a {height}x{width} "
                                   f"image with patch_size {patch_size} (needs {needed})")
        if bias is not None:
            torch._check_value(bias.dim() == 1, lambda: f"l2p: bias must be 1-D, got {bias.shape}")
            torch._check_value(bias.shape[0] == weight.shape[0],
                               lambda: f"l2p: bias must be ({weight.shape[0]}), got {bias.shape}")
        channels = weight.shape[0] // pp
        return tokens.new_empty((tokens.shape[0], channels, height, width))


if _extension.is_compiled():
    _register_fake_kernels()
