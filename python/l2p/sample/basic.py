"""A minimal pixel-space sampler: the source's own scheduler drives the pixel model.

L2P keeps the source's prediction convention, sign and token grid, so sampling is the source
pipeline's denoising loop with the VAE removed: start from Gaussian pixels, call the pixel model
with the source's conditioning each step (classifier-free guidance with the empty caption) and
let the source scheduler update the image. This is what the trainer uses for its sample grids.
It works for flow-matching sources (FlowMatchEuler, DPM-Solver in flow mode) and DDPM-style
ones (epsilon / v) alike, since it only calls the scheduler's ``set_timesteps`` / ``step``; the
loop itself is ``L2PPipeline``'s.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from l2p.atomic import atomic_path
from l2p.sample.pipeline import denoise
from l2p.sample.schedule import recipe_for
from l2p.train import conditioning as condmod


def _scheduler(scheduler_config: dict):
    import diffusers

    cls = getattr(diffusers, scheduler_config["_class_name"])
    return cls.from_config(scheduler_config)


@torch.no_grad()
def sample_images(model, cond: dict, empty_cond: dict, *, scheduler_config: dict, steps: int = 20,
                  guidance: float = 4.5, seed: int = 0, height: int = 64, width: int = 64,
                  flow_guidance: float = 1.0) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for the B captions encoded in ``cond``.

    Args:
        model: a pixel model (``l2p.convert_to_pixel``) of a family whose adapter has text
            conditioning (``SourceAdapter.has_conditioning``).
        cond / empty_cond: the captions' conditioning tensors (``TextEncoder`` or the embedding
            cache) and those of the empty caption (batch 1), used for CFG.
        scheduler_config: the source pipeline's scheduler config (with ``_class_name``).
        guidance: CFG scale; 1 turns CFG off. ``flow_guidance`` feeds guidance-distilled
            models (FLUX-dev style guidance embedding).
        seed: the initial noise (and a stochastic scheduler's step noise) is drawn on the CPU
            from this seed, so images do not depend on the device.
    The loop is ``L2PPipeline``'s (``l2p.sample.pipeline.denoise``): the source pipeline's
    timesteps (incl. the dynamic shift from the token count) and calls.
    """
    source_class = model.config.source_class
    batch = next(v.shape[0] if isinstance(v, torch.Tensor) else len(v) for v in cond.values())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=g)
    uncond = None
    if guidance != 1.0:
        uncond = condmod.select(cond, torch.zeros(batch, dtype=torch.bool), empty_cond)
    x = denoise(model, condmod.family_for(source_class), recipe_for(source_class), _scheduler(scheduler_config),
                x, cond, uncond, steps=steps, cfg_scale=guidance, embedded_guidance=flow_guidance, generator=g)
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: str | Path, columns: int) -> Path:
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG, ``columns`` per row."""
    from PIL import Image

    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"save_grid: columns must be a positive int, got {columns!r}")
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * h, columns * w)
    for i, img in enumerate(images.float().cpu()):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = (img + 1) / 2
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
