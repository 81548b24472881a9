"""Pixel-space sampling: ``L2PPipeline`` (text to image with a converted model), attention
through ``l2p.ops`` (``set_attention``), the tiled Detailer Head (``l2p.sample.tiling``,
``PixelTransformer2DModel.enable_head_tiling``) and the UHR recommendations
(``recommended_shift``, ``recommended_patch_size``). ``l2p.sample.basic`` is the trainer's
minimal sampler for its sample grids."""

from __future__ import annotations

_LAZY = {
    "L2PPipeline": "l2p.sample.pipeline",
    "set_attention": "l2p.sample.attention",
    "attention_mode": "l2p.sample.attention",
    "head_halo": "l2p.sample.tiling",
    "recommended_shift": "l2p.sample.schedule",
    "recommended_patch_size": "l2p.sample.schedule",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'l2p.sample' has no attribute {name!r}")


__all__ = list(_LAZY)
