"""One adapter per diffusers transformer family; adding a family is one file here plus one
line in ADAPTERS."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from l2p.adapters.base import SourceAdapter
from l2p.adapters.dit import DiTAdapter
from l2p.adapters.flux import FluxAdapter
from l2p.adapters.lumina2 import Lumina2Adapter
from l2p.adapters.pixart import PixArtAdapter
from l2p.adapters.qwen_image import QwenImageAdapter
from l2p.adapters.sana import SanaAdapter
from l2p.adapters.sd3 import SD3Adapter
from l2p.adapters.z_image import ZImageAdapter

ADAPTERS: dict[str, type[SourceAdapter]] = {
    "DiTTransformer2DModel": DiTAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
    "SanaTransformer2DModel": SanaAdapter,
    "ZImageTransformer2DModel": ZImageAdapter,
    "QwenImageTransformer2DModel": QwenImageAdapter,
    "Lumina2Transformer2DModel": Lumina2Adapter,
}

SUPPORTED = tuple(ADAPTERS)


def get_adapter(source_class: str, config: Mapping[str, Any]) -> SourceAdapter:
    """The adapter for a diffusers transformer class name, bound to its config."""
    if source_class not in ADAPTERS:
        raise ValueError(
            f"{source_class} is not supported by L2P; supported transformers: "
            f"{', '.join(SUPPORTED)}"
        )
    return ADAPTERS[source_class](config)


__all__ = ["ADAPTERS", "SUPPORTED", "SourceAdapter", "get_adapter"]
