"""l2p: latent-to-pixel transfer.

Turns a pretrained latent diffusion transformer (diffusers) into a pixel-space generator:
the VAE is dropped, pixels enter through large patches so the token grid is unchanged, a
light conv U-Net (the Detailer Head) replaces the output layer, and only the input
embedding, the first and last blocks and the head are trained.
"""

__version__ = "0.1.0"

from l2p import ops  # noqa: E402

# The conversion API imports diffusers; it loads on first use so ``import l2p.ops`` and
# ``l2p info`` stay light.
_LAZY = {
    "ConversionReport": "l2p.conversion",
    "TrainableReport": "l2p.conversion",
    "convert_to_pixel": "l2p.conversion",
    "load_delta": "l2p.conversion",
    "merge_delta": "l2p.conversion",
    "save_delta": "l2p.conversion",
    "set_trainable": "l2p.conversion",
    "DetailerHead": "l2p.models",
    "LinearHead": "l2p.models",
    "PixelPatchEmbed": "l2p.models",
    "PixelTransformer2DModel": "l2p.models",
    "L2PPipeline": "l2p.sample",
    # diffusers' pipeline loader finds a component's load method by looking its base class
    # up in the component's library (model_index.json names ["l2p", "PixelTransformer2DModel"]).
    "ModelMixin": "diffusers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'l2p' has no attribute {name!r}")


__all__ = ["__version__", "ops", *(n for n in _LAZY if n != "ModelMixin")]
