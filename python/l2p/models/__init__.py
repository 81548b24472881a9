"""Pixel-space modules: the pixel patch embedding, the output heads and the converted
model that carries a source transformer between them."""

from l2p.models.detailer_head import DetailerHead, default_detailer_channels
from l2p.models.heads import HEADS, build_head, complete_head_config
from l2p.models.linear_head import LinearHead
from l2p.models.pixel_embed import PixelPatchEmbed
from l2p.models.splice import FeatureTap, PixelInput
from l2p.models.pixel_transformer import PixelTransformer2DModel  # noqa: E402  (needs the above)

__all__ = [
    "HEADS",
    "DetailerHead",
    "FeatureTap",
    "LinearHead",
    "PixelInput",
    "PixelPatchEmbed",
    "PixelTransformer2DModel",
    "build_head",
    "default_detailer_channels",
    "complete_head_config",
]
