"""``l2p.ops.unpatchify``: tokens -> Linear(D, C*p*p) -> image, fused projection + fold."""

from __future__ import annotations

import torch

from l2p.ops import _checks, _dispatch, _extension
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
    p = _checks.require_patch_size(patch_size)
    _checks.require_same("tokens", tokens, weight=weight, bias=bias)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
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
    @torch.library.register_fake("l2p::unpatchify")
    def _(tokens, weight, bias, patch_size, height, width):
        channels = weight.shape[0] // (patch_size * patch_size)
        return tokens.new_empty((tokens.shape[0], channels, height, width))


if _extension.is_compiled():
    _register_fake_kernels()
