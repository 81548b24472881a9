"""Output heads by name. A head config is a dict saved in the pixel model's config.json:
``{"type": "detailer", "channels": [...]}`` or ``{"type": "linear"}``. A partial detailer
config may give ``max_channels`` (the bottleneck width; the levels above halve) instead of
the list, which then follows from the patch size."""

from __future__ import annotations

from typing import Any

from torch import nn

from l2p.models.detailer_head import DetailerHead, default_detailer_channels
from l2p.models.linear_head import LinearHead

HEADS = ("detailer", "linear")


def complete_head_config(head: str | dict[str, Any], patch_size: int) -> dict[str, Any]:
    """The complete, explicit config of a head given by name or partial dict."""
    config = {"type": head} if isinstance(head, str) else dict(head)
    kind = config.get("type")
    if kind not in HEADS:
        raise ValueError(f"head must be one of {HEADS} (or a dict with 'type'), got {head!r}")
    if kind == "detailer":
        if config.get("channels") and config.get("max_channels"):
            raise ValueError("give the detailer head either channels or max_channels, not both")
        channels = config.get("channels") or default_detailer_channels(
            patch_size, int(config.get("max_channels") or 512))
        unknown = set(config) - {"type", "channels", "max_channels"}
        config = {"type": "detailer", "channels": [int(c) for c in channels]}
    else:
        unknown = set(config) - {"type"}
    if unknown:
        raise ValueError(f"unknown {kind} head options {sorted(unknown)}")
    return config


def build_head(config: dict[str, Any], *, token_dim: int, patch_size: int) -> nn.Module:
    config = complete_head_config(config, patch_size)
    if config["type"] == "detailer":
        return DetailerHead(patch_size, token_dim, channels=config["channels"])
    return LinearHead(patch_size, token_dim)
