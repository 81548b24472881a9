"""Output heads by name. A head config is a dict saved in the pixel model's config.json:
``{"type": "detailer", "channels": [...]}`` or ``{"type": "linear"}``. A partial detailer
config may give ``max_channels`` (the bottleneck width; the levels above halve) instead of
the list, which then follows from the patch size. Detailer layout options: ``pool`` ("avg" or
"max") and ``up_convs`` (see DetailerHead); either head may set ``features`` (FEATURES)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from l2p.models.detailer_head import DetailerHead, default_detailer_channels
from l2p.models.linear_head import LinearHead
from l2p.ops._checks import require_positive_int

HEADS = ("detailer", "linear")
# What the head reads from the transformer: "final_norm", the last-layer token features after
# the source's final norm and modulation (what its output projection read; the default), or
# "blocks", the last block's output before the final layer (the published L2P checkpoints).
FEATURES = ("final_norm", "blocks")


def complete_head_config(head: str | dict[str, Any], patch_size: int) -> dict[str, Any]:
    """The complete, explicit config of a head given by name or partial dict."""
    if not isinstance(head, (str, Mapping)):
        raise ValueError(f"head must be one of {HEADS} (or a dict with 'type'), got {head!r}")
    config = {"type": head} if isinstance(head, str) else dict(head)
    kind = config.get("type")
    if kind not in HEADS:
        raise ValueError(f"head must be one of {HEADS} (or a dict with 'type'), got {head!r}")
    if kind == "detailer":
        channels, max_channels = config.get("channels"), config.get("max_channels")
        if channels is not None and max_channels is not None:
            raise ValueError("give the detailer head either channels or max_channels, not both")
        if channels is None:
            # 0 or a negative width is a mistake, not a request for the default (512).
            width = 512 if max_channels is None else require_positive_int("detailer head max_channels",
                                                                          max_channels)
            channels = default_detailer_channels(patch_size, width)
        elif isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
            raise ValueError(f"detailer head channels must be a list of positive ints (one width per "
                             f"level), got {channels!r}")
        unknown = set(config) - {"type", "channels", "max_channels", "pool", "up_convs", "features"}
        complete = {"type": "detailer",
                    "channels": [require_positive_int("detailer head channels entry", c) for c in channels]}
        # Non-default layout options only, so configs written before they existed read the same.
        pool = config.get("pool", "avg")
        if pool not in ("avg", "max"):
            raise ValueError(f"detailer head pool must be 'avg' or 'max', got {pool!r}")
        if pool != "avg":
            complete["pool"] = pool
        if not isinstance(config.get("up_convs", False), bool):
            raise ValueError(f"detailer head up_convs must be true or false, got {config['up_convs']!r}")
        if config.get("up_convs"):
            complete["up_convs"] = True
    else:
        unknown = set(config) - {"type", "features"}
        complete = {"type": kind}
    if unknown:
        raise ValueError(f"unknown {kind} head options {sorted(unknown)}")
    features = config.get("features", "final_norm")
    if features not in FEATURES:
        raise ValueError(f"head features must be one of {FEATURES}, got {features!r}")
    if features != "final_norm":
        complete["features"] = features
    return complete


def build_head(config: dict[str, Any], *, token_dim: int, patch_size: int) -> nn.Module:
    config = complete_head_config(config, patch_size)
    if config["type"] == "detailer":
        return DetailerHead(patch_size, token_dim, channels=config["channels"],
                            pool=config.get("pool", "avg"), up_convs=config.get("up_convs", False))
    return LinearHead(patch_size, token_dim)
