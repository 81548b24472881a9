"""``convert_to_pixel``: a latent diffusers transformer -> a ``PixelTransformer2DModel``."""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from l2p.adapters import ADAPTERS, get_adapter
from l2p.models import PixelTransformer2DModel, complete_head_config

_SOURCE_PREFIX = "transformer."


@dataclass
class ConversionReport:
    """What ``convert_to_pixel`` copied from the source and what it initialised."""

    source_class: str
    patch_size: int
    copied: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    # Source tensors with no same-name, same-shape place in the pixel model.
    dropped: list[str] = field(default_factory=list)
    # False on the meta device, where there is no data to copy or compare.
    verified: bool = False

    def new_layers(self) -> set[str]:
        """The layers (module names) that were initialised: every parameter under them is new,
        including one that was copied because its name and shape matched (the pixel
        embedding's bias)."""
        return {name.rpartition(".")[0] for name in self.initialised}

    def __str__(self) -> str:
        state = "verified bit-identical" if self.verified else "not verified (meta device)"
        return (f"{self.source_class} -> pixel patch {self.patch_size}: copied "
                f"{len(self.copied)} tensors ({state}), initialised {len(self.initialised)}, "
                f"dropped {len(self.dropped)} ({', '.join(self.dropped) or '-'})")


@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device (buffers and plain tensors stay real):
    the pixel model is built without allocating weights that are about to be copied."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _source_config(transformer: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}


def convert_to_pixel(
    transformer: nn.Module,
    *,
    vae_scale_factor: int | None = None,
    patch_size: int | None = None,
    head: str | dict[str, Any] = "detailer",
    seed: int = 0,
) -> PixelTransformer2DModel:
    """Convert a latent diffusers transformer to pixel space.

    Every source tensor whose name and shape match a tensor of the pixel model is copied and
    the copies are checked bit-identical; the new layers (pixel patch embedding, head) are
    initialised deterministically from ``seed`` (the global RNG is left untouched). The
    source model is not modified. A source on the meta device gives a meta pixel model
    (shapes only).

    Args:
        transformer: one of the supported diffusers transformers (``l2p.adapters.SUPPORTED``).
        vae_scale_factor: the VAE's downsampling factor; default the family's (8; Sana 32).
        patch_size: the pixel patch P; default latent patch x VAE factor, which keeps the
            latent token grid. Larger powers of two (e.g. 64 at 4K) keep the grid small.
        head: "detailer", "linear" or a head config dict.
        seed: seed of the new layers' initialisation.
    """
    name = type(transformer).__name__
    if name not in ADAPTERS or not hasattr(transformer, "config"):
        raise ValueError(
            f"{name} is not supported by L2P; supported transformers: {', '.join(ADAPTERS)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        # torch.manual_seed would take 1.5 as 1, and fail on "x" in int()'s words.
        raise ValueError(f"seed must be an int, got {seed!r}")
    config = _source_config(transformer)
    adapter = get_adapter(name, config)
    patch = adapter.pixel_patch_size(vae_scale_factor, patch_size)
    head_cfg = complete_head_config(head, patch)

    source_tensors = dict(transformer.named_parameters())
    source_tensors.update(transformer.named_buffers())
    any_tensor = next(iter(source_tensors.values()))
    device, dtype = any_tensor.device, transformer.dtype
    on_meta = device.type == "meta"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta") if on_meta else contextlib.nullcontext(), parameters_on_meta():
            pixel = PixelTransformer2DModel(name, config, patch, head_cfg)

        report = ConversionReport(name, patch, verified=not on_meta)
        plan: list[tuple[nn.Module, str, torch.Tensor | None]] = []
        fresh_modules: list[nn.Module] = []
        for prefix, module in pixel.named_modules():
            for leaf, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{prefix}.{leaf}" if prefix else leaf
                src = _match(source_tensors, full, param.shape)
                (report.copied if src is not None else report.initialised).append(full)
                plan.append((module, leaf, src))
                if src is None and not on_meta:
                    # New layers are initialised on the CPU in float32, so the result is
                    # the same on every device, then moved to the source's dtype/device.
                    module._parameters[leaf] = nn.Parameter(torch.empty(param.shape))
                    if module not in fresh_modules:
                        fresh_modules.append(module)
            for leaf, buf in module._buffers.items():
                src = None if buf is None else _match(
                    source_tensors, f"{prefix}.{leaf}" if prefix else leaf, buf.shape
                )
                if src is not None and not on_meta:
                    module._buffers[leaf] = src.detach().clone()
        if not on_meta:
            for module in fresh_modules:
                module.reset_parameters()
            # Copies last: reset_parameters() also touches a module's copied tensors
            # (e.g. the latent embedding's bias, which keeps its name and shape).
            for module, leaf, src in plan:
                value = src.detach().clone() if src is not None else \
                    module._parameters[leaf].detach().to(device=device, dtype=dtype)
                module._parameters[leaf] = nn.Parameter(value, requires_grad=True)

    copied = set(report.copied)
    report.dropped = sorted(
        n for n in dict(transformer.named_parameters()) if _SOURCE_PREFIX + n not in copied
    )
    if not on_meta:
        pixel_tensors = dict(pixel.named_parameters())
        for full in report.copied:
            if not torch.equal(pixel_tensors[full], source_tensors[full[len(_SOURCE_PREFIX):]]):
                raise RuntimeError(f"copy of {full} is not bit-identical to the source")
    pixel.conversion_report = report
    pixel.train(transformer.training)
    return pixel


def _match(source_tensors: dict[str, torch.Tensor], full: str, shape) -> torch.Tensor | None:
    if not full.startswith(_SOURCE_PREFIX):
        return None
    src = source_tensors.get(full[len(_SOURCE_PREFIX):])
    return src if src is not None and src.shape == shape else None
