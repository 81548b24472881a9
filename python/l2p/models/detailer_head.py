"""The Detailer Head (DiP, used by L2P over the whole image): a light conv U-Net on the
noisy image whose bottleneck sits on the token grid and takes the last-layer token
features."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from l2p.ops import _checks


def default_detailer_channels(patch_size: int, max_channels: int = 512) -> list[int]:
    """Encoder widths, one per level, doubling up to ``max_channels`` at the bottleneck (at
    least 8): with 512, 64,128,256,512 for P=16 and 16,32,64,128,256,512 for P=64 (the
    official 1K and 4K heads)."""
    levels = int(math.log2(patch_size))
    return [max(max_channels >> (levels - 1 - i), 8) for i in range(levels)]


class DetailerHead(nn.Module):
    """Conv U-Net over the full noisy image x_t with the token features at its bottleneck.

    Encoder: per level a 3x3 conv + SiLU (kept as the skip), then 2x2 pooling (average, or
    max with ``pool="max"``); log2(P) levels bring (H, W) down to the token grid (H/P, W/P).
    Bottleneck: the token features (B, D, H/P, W/P) are concatenated and fused by a 1x1 conv
    + SiLU. Decoder: per level 2x nearest upsampling (followed by a width-keeping 3x3 conv
    with ``up_convs=True``), concatenation with the skip, 3x3 conv + SiLU (widths mirror the
    encoder: 512 -> 256 -> 128 -> 64 -> 64 at P=16); a 1x1 conv gives the output channels.
    ``pool="max", up_convs=True`` is the decoder of the published L2P checkpoints
    (l2p.conversion.published_l2p).
    """

    def __init__(
        self,
        patch_size: int,
        token_dim: int,
        channels: list[int] | tuple[int, ...] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        pool: str = "avg",
        up_convs: bool = False,
    ):
        super().__init__()
        patch_size = _checks.require_patch_size(patch_size)
        token_dim = _checks.require_positive_int("token_dim", token_dim)
        if pool not in ("avg", "max"):
            raise ValueError(f"DetailerHead pool must be 'avg' or 'max', got {pool!r}")
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(
                f"DetailerHead needs a power-of-two patch_size >= 2 (one 2x2 pooling per level), "
                f"got {patch_size}"
            )
        levels = int(math.log2(patch_size))
        channels = list(channels) if channels is not None else default_detailer_channels(patch_size)
        if len(channels) != levels or any(int(c) <= 0 for c in channels):
            raise ValueError(
                f"DetailerHead channels must list {levels} positive widths for patch_size "
                f"{patch_size} (log2 of it), got {channels}"
            )
        self.patch_size = patch_size
        self.token_dim = token_dim
        self.channels = [int(c) for c in channels]
        widths = [in_channels] + self.channels
        self.encoder = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(levels)
        )
        self.fuse = nn.Conv2d(self.channels[-1] + token_dim, self.channels[-1], 1)
        # Decoder level i (finest = 0) outputs the width of the encoder level above it.
        dec_out = [self.channels[0]] + self.channels[:-1]
        dec_in = [self.channels[-1]] + dec_out[:0:-1]
        self.decoder = nn.ModuleList(
            nn.Conv2d(dec_in[k] + self.channels[levels - 1 - k], dec_out[levels - 1 - k], 3, padding=1)
            for k in range(levels)
        )
        self.proj_out = nn.Conv2d(self.channels[0], out_channels, 1)
        self.pool = pool
        # Decoder level k's upsampled input through a 3x3 conv of the same width (no activation).
        self.up = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in dec_in) if up_convs else None

    # Set by enable_tiling: None = untiled, 0 = tiles sized from free memory, else the tile
    # side in pixels (l2p.sample.tiling).
    tile_size: int | None = None

    def enable_tiling(self, tile_size: int | None = None) -> None:
        """Run in tiles of ``tile_size`` pixels (a multiple of P; None: sized from the free
        memory at each call) with an exact halo: same output, memory bounded by the tile."""
        from l2p.sample.tiling import check_tile_size

        self.tile_size = check_tile_size(self, tile_size) or 0

    def disable_tiling(self) -> None:
        self.tile_size = None

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """image (B, C, H, W), tokens (B, (H/P)*(W/P), D) row-major -> (B, out, H, W)."""
        _checks.require_input("image", image, 4, "(B, C, H, W)")
        _checks.require_input("tokens", tokens, 3, "(B, (H/P)*(W/P), D)")
        b, c, h, w = image.shape
        # Off the patch grid the pooling floors and the decoder's concatenation fails in torch
        # terms; a token count for another grid fails in the reshape below.
        _checks.require_divisible(h, w, self.patch_size, what="image")
        rows, cols = h // self.patch_size, w // self.patch_size
        expected = (b, rows * cols, self.token_dim)
        if c != self.encoder[0].in_channels or tuple(tokens.shape) != expected:
            raise ValueError(
                f"the Detailer Head (patch_size {self.patch_size}, token_dim {self.token_dim}) takes an "
                f"image (B, {self.encoder[0].in_channels}, H, W) and its tokens (B, (H/P)*(W/P), "
                f"{self.token_dim}), here {expected} for the {tuple(image.shape)} image; got tokens "
                f"{tuple(tokens.shape)}"
            )
        grid = tokens.transpose(1, 2).reshape(b, tokens.shape[2], rows, cols)
        if self.tile_size is not None:
            from l2p.sample.tiling import tiled_forward

            return tiled_forward(self, image, grid, self.tile_size or None)
        return self.forward_grid(image, grid)

    def forward_grid(self, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """image (B, C, H, W), token features as a grid (B, D, H/P, W/P) -> (B, out, H, W)."""
        skips = []
        x = image
        pool = F.max_pool2d if self.pool == "max" else F.avg_pool2d
        for conv in self.encoder:
            x = F.silu(conv(x))
            skips.append(x)
            x = pool(x, 2)
        x = F.silu(self.fuse(torch.cat([x, grid.to(x.dtype)], dim=1)))
        for k, conv in enumerate(self.decoder):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if self.up is not None:
                x = self.up[k](x)
            x = F.silu(conv(torch.cat([x, skips.pop()], dim=1)))
        return self.proj_out(x)
