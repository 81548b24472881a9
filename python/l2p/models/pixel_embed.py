"""Pixels enter the transformer here: one token per P x P pixel patch."""

from __future__ import annotations

import math

import torch
from torch import nn

from l2p.ops import _checks, patch_embed


class PixelPatchEmbed(nn.Module):
    """Linear(3*P*P -> D) applied to each non-overlapping P x P patch of an image.

    The weight is stored in ``nn.Conv2d`` layout (D, C, P, P) so it reads like the latent
    ``PatchEmbed`` it replaces; the forward runs the fused ``l2p.ops.patch_embed``.
    """

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3, bias: bool = True):
        super().__init__()
        patch_size = _checks.require_patch_size(patch_size)
        embed_dim = _checks.require_positive_int("embed_dim", embed_dim)
        in_channels = _checks.require_positive_int("in_channels", in_channels)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        self.weight = nn.Parameter(torch.empty(embed_dim, in_channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.empty(embed_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, so a fresh pixel embedding starts at the scale the
        # latent embedding was trained from.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.patch_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, (H/P)*(W/P), D), row-major over the patch grid."""
        return patch_embed(pixels, self.weight, self.bias, patch_size=self.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(pixels)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, embed_dim={self.embed_dim}, "
                f"patch_size={self.patch_size}, bias={self.bias is not None}")
