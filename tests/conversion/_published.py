"""A checkpoint in the published L2P layout, built here (tests only): diffusers' Z-Image
configured for pixels plus a decoder written from the layout the public ports read
(l2p/conversion/published_l2p.py)."""

from __future__ import annotations

import diffusers
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F


class PublishedDecoder(nn.Module):
    """The published decoder: conv+SiLU and 2x2 max pooling per level, a 1x1 bottleneck on
    [pooled, token features], then per level 2x nearest + 3x3 conv, concat with the skip, 3x3
    conv + SiLU; a 1x1 output conv. Predicts x0 - noise."""

    def __init__(self, dim: int, widths: list[int]):
        super().__init__()
        levels = len(widths)
        ins = [3] + widths[:-1]
        for i in range(levels):
            setattr(self, f"enc{i + 1}", nn.Sequential(nn.Conv2d(ins[i], widths[i], 3, padding=1), nn.SiLU()))
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1] + dim, widths[-1], 1), nn.SiLU())
        outs = [widths[0]] + widths[:-1]  # dec{i} output widths
        ups = [widths[-1]] + outs[::-1][:-1]  # up{L}..up{1} widths, coarse to fine
        for k, level in enumerate(range(levels, 0, -1)):
            setattr(self, f"up{level}", nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                       nn.Conv2d(ups[k], ups[k], 3, padding=1)))
            setattr(self, f"dec{level}", nn.Sequential(
                nn.Conv2d(ups[k] + widths[level - 1], outs[level - 1], 3, padding=1), nn.SiLU()))
        self.out_conv = nn.Conv2d(widths[0], 3, 1)
        self.levels = levels

    def forward(self, x, features):
        skips = []
        for i in range(1, self.levels + 1):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(torch.cat([x, features], dim=1))
        for level in range(self.levels, 0, -1):
            x = getattr(self, f"up{level}")(x)
            x = getattr(self, f"dec{level}")(torch.cat([x, skips.pop()], dim=1))
        return self.out_conv(x)


def write_published(path, dit_config: dict, patch: int, channels: list[int], *, seed: int = 7,
                    drop: str | None = None, prefix: str = ""):
    """Write a random published-layout checkpoint for a Z-Image of ``dit_config`` at pixel patch
    ``patch`` (log2 of it decoder levels, ``channels`` wide); returns (pixel-space Z-Image,
    decoder), the model the file holds."""
    torch.manual_seed(seed)
    pixel_dit = diffusers.ZImageTransformer2DModel.from_config(
        {**dit_config, "all_patch_size": (patch,), "in_channels": 3}).eval()
    decoder = PublishedDecoder(dit_config["dim"], channels).eval()
    tensors = dict(pixel_dit.state_dict())
    tensors.update({f"local_decoder.{k}": v for k, v in decoder.state_dict().items()})
    save_file({prefix + k: v.contiguous() for k, v in tensors.items() if k != drop}, str(path))
    return pixel_dit, decoder
