"""Tiled Detailer Head: the same output as the untiled head, with memory bounded by the tile.

Why a halo of 2P pixels is exact (3x3 convolutions, P = 2^L, L levels)
----------------------------------------------------------------------
Cut a tile whose edges lie on the P-pixel grid, so every 2x2 pooling cell of every level
lies wholly inside or wholly outside it and the bottleneck cells are whole tokens. Inside
the tile the head computes exactly what it computes on the image, except where a
convolution reads past the tile edge: there it reads zero padding instead of image. Track
the width b (in pixels) of the band along the edge that may hold wrong values:

- encoder level i (cell 2^i px): a k x k conv with padding r = (k-1)/2 widens the band by
  r cells, b <- ceil(b / 2^i) 2^i + r 2^i; the conv output is level i's skip; the 2x2
  pooling rounds the band up to whole cells of level i+1, b <- ceil(b / 2^(i+1)) 2^(i+1).
  With 3x3 convs: b = 1, 2 | 4, 4 | 8, 8 | ... | P after the last pooling.
- bottleneck: the token features of the tile are the matching window of the token grid
  (computed by the transformer on the whole image, so exact); the 1x1 fuse conv does not
  widen the band.
- decoder level i (coarse to fine): nearest upsampling keeps the band in pixels, the skip
  concatenation takes the wider of the two bands, the conv adds r 2^i:
  b = P + P/2 + ... + 1 = 2P - 1 with 3x3 convs; the final 1x1 conv adds nothing. A head
  with a 3x3 conv after each upsampling (``up_convs``, the published L2P decoder) adds as
  much again before each concatenation: b = P + 2 (P/2 + ... + 1) = 3P - 2, a 3P halo.
  Max pooling and average pooling read the same whole cells.

So a halo of ``head_halo(head)`` = 2P - 1 rounded up to the P grid = 2P pixels around each
tile (two tokens) makes the tile's interior exact; at the image border the tile edge is the
image edge and the zero padding is the head's own. ``head_halo`` derives the band from the
head's actual modules (levels, kernel sizes, paddings), not from the formula.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

# The head's activations may use this fraction of the free memory when the tile size is
# chosen automatically.
MEMORY_FRACTION = 0.25


def _conv_reach(conv: torch.nn.Conv2d) -> int:
    """Cells a conv reads past its output position (its zero-padding band), checked to be
    the 'same' convolution the head uses."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or kh != kw or ph != pw or 2 * ph != kh - 1:
        raise ValueError(f"head tiling needs stride-1 'same' convolutions, got {conv}")
    return ph


def head_halo(head) -> int:
    """The halo in pixels (a multiple of the patch size) that makes tiled == untiled; see the
    module docstring for the derivation (2P for the 3x3 Detailer Head, 3P with up convs)."""
    from l2p.models.detailer_head import DetailerHead

    if not isinstance(head, DetailerHead):
        raise TypeError(f"head_halo takes a DetailerHead (model.head of a pixel model with the detailer head), "
                        f"got {type(head).__name__}; a LinearHead is per-token and needs no halo")
    p, band = head.patch_size, 0
    for i, conv in enumerate(head.encoder):
        cell = 2**i
        band = math.ceil(band / cell) * cell + _conv_reach(conv) * cell
        band = math.ceil(band / (2 * cell)) * 2 * cell
    band += _conv_reach(head.fuse) * p
    up = getattr(head, "up", None)
    for k, conv in enumerate(head.decoder):
        cell = 2 ** (len(head.decoder) - 1 - k)
        if up is not None:  # the conv after the upsampling widens the band before the skip joins
            band = math.ceil(band / cell) * cell + _conv_reach(up[k]) * cell
        band = math.ceil(band / cell) * cell + _conv_reach(conv) * cell
    band += _conv_reach(head.proj_out)
    return math.ceil(band / p) * p


def head_bytes_per_pixel(head, dtype: torch.dtype = torch.float32) -> float:
    """An upper estimate of the head's inference activation bytes per input pixel: every
    skip kept at once, plus the widest decoder step (upsampled map, its concatenation with
    the skip and the conv output)."""
    size = torch.empty((), dtype=dtype).element_size()
    levels = len(head.encoder)
    skips = sum(c / 4**i for i, c in enumerate(head.channels))
    widest = 0.0
    up = getattr(head, "up", None)
    for k, conv in enumerate(head.decoder):
        i = levels - 1 - k
        upsampled = conv.in_channels - head.channels[i]  # the decoder's own part of the concat
        extra = upsampled if up is not None else 0  # the up conv's output beside its input
        widest = max(widest, (2 * conv.in_channels + conv.out_channels + extra) / 4**i)
    io = head.encoder[0].in_channels + head.proj_out.out_channels
    return size * (skips + widest + io)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (CUDA: the allocator's view; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def auto_tile_size(head, device, dtype: torch.dtype, budget: int | None = None) -> int:
    """The largest tile (a multiple of P, at least P) whose haloed window's activations fit
    ``budget`` bytes (default MEMORY_FRACTION of the free memory)."""
    if budget is None:
        budget = int(MEMORY_FRACTION * free_memory(device))
    side = math.isqrt(max(int(budget / head_bytes_per_pixel(head, dtype)), 1))
    p = head.patch_size
    return max(p, (side - 2 * head_halo(head)) // p * p)


def check_tile_size(head, tile_size: int | None) -> int | None:
    if tile_size is None:
        return None
    p = head.patch_size
    if isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral) or tile_size < p or tile_size % p:
        raise ValueError(
            f"tile_size must be a positive multiple of the patch size {p} (tiles sit on the "
            f"pooling grid), got {tile_size!r}"
        )
    return int(tile_size)


def tiled_forward(head, image: torch.Tensor, grid: torch.Tensor, tile_size: int | None) -> torch.Tensor:
    """The head on ``image`` (B, C, H, W) with token grid (B, D, H/P, W/P), tile by tile:
    equal to the untiled head, activations bounded by (tile + 2 halo)^2 pixels."""
    p = head.patch_size
    b, _, h, w = image.shape
    tile = tile_size or auto_tile_size(head, image.device, image.dtype)
    halo = head_halo(head)
    if tile >= h and tile >= w:
        return head.forward_grid(image, grid)
    out = None
    for y0 in range(0, h, tile):
        y1, ya = min(y0 + tile, h), max(0, y0 - halo)
        yb = min(h, y1 + halo)
        for x0 in range(0, w, tile):
            x1, xa = min(x0 + tile, w), max(0, x0 - halo)
            xb = min(w, x1 + halo)
            part = head.forward_grid(image[:, :, ya:yb, xa:xb], grid[:, :, ya // p:yb // p, xa // p:xb // p])
            if out is None:
                out = part.new_empty(b, part.shape[1], h, w)
            out[:, :, y0:y1, x0:x1] = part[:, :, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    return out
