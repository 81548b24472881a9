"""The plain output head: each token projected to its P x P pixel patch."""

from __future__ import annotations

import math

import torch
from torch import nn

from l2p.ops import _checks, unpatchify


class LinearHead(nn.Module):
    """Linear(D -> C*P*P) per token, folded into the image by ``l2p.ops.unpatchify``; the
    noisy image is not used (the baseline the Detailer Head is measured against)."""

    def __init__(self, patch_size: int, token_dim: int, out_channels: int = 3):
        super().__init__()
        patch_size = _checks.require_patch_size(patch_size)
        token_dim = _checks.require_positive_int("token_dim", token_dim)
        out_channels = _checks.require_positive_int("out_channels", out_channels)
        self.patch_size = patch_size
        self.token_dim = token_dim
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels * patch_size**2, token_dim))
        self.bias = nn.Parameter(torch.empty(out_channels * patch_size**2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.token_dim)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(
            tokens, self.weight, self.bias,
            patch_size=self.patch_size, height=image.shape[2], width=image.shape[3],
        )
