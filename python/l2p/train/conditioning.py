"""Captions -> the keyword arguments each source family's transformer takes.

Each family's adapter (l2p/adapters/) says how its pipeline encodes prompts
(``encode_prompt``, the source's own text encoders and truncation) and how the transformer is
called with those tensors, the noisy image and the time, in the convention its pipeline uses. The tensors of one
caption are a dict of named tensors (batch-first) or per-sample lists, the same names the text
embedding cache stores, so training with the cache never loads a text encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import torch

Cond = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """How one source family is conditioned and called; both parts live on its adapter
    (``encode_prompts``, ``transformer_kwargs`` in l2p/adapters/)."""

    encode: Callable[[Any, list[str], torch.device], Cond]
    # (cond, x_t, timesteps, model, guidance) -> transformer kwargs (x_t included).
    call: Callable[..., dict]
    # Negative prompts for classifier-free guidance, encoded as the source pipeline does.
    encode_negative: Callable[[Any, list[str], torch.device], Cond]
    # (uncond output, cond output, scale, pixel patch, options) -> the guided output.
    guide: Callable[..., torch.Tensor]
    # (step, num_steps, t, options) -> whether this step is guided.
    guides_step: Callable[..., bool]
    # The pipeline's own guidance options and their defaults.
    guidance_options: Mapping[str, Any]


def family_for(source_class: str) -> Family:
    from l2p.adapters import ADAPTERS

    adapter = ADAPTERS.get(source_class)
    if adapter is None or not adapter.has_conditioning():
        conditioned = [name for name, cls in ADAPTERS.items() if cls.has_conditioning()]
        raise ValueError(f"no conditioning for {source_class} yet (it converts, but does "
                         f"not train or sample); families with one: {', '.join(conditioned)}")
    return Family(adapter.encode_prompts, adapter.transformer_kwargs,
                  adapter.encode_negative_prompts or adapter.encode_prompts, adapter.guide,
                  adapter.guides_step, MappingProxyType(dict(adapter.guidance_options)))


# ---------------------------------------------------------------------------------------------
# batches of conditioning


def select(cond: Cond, keep: torch.Tensor, empty: Cond) -> Cond:
    """Per sample: ``cond`` where ``keep`` else the empty-caption conditioning (caption
    dropout). ``empty`` holds one sample (batch 1)."""
    out = {}
    for name, value in cond.items():
        if isinstance(value, torch.Tensor):
            filler = empty[name].to(value.device, value.dtype).expand_as(value)
            mask = keep.to(value.device).view(-1, *([1] * (value.dim() - 1)))
            out[name] = torch.where(mask, value, filler)
        else:
            out[name] = [v if k else empty[name][0] for v, k in zip(value, keep.tolist())]
    return out


def to_device(cond: Cond, device: torch.device, dtype: torch.dtype | None = None) -> Cond:
    def move(t):
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return {k: move(v) if isinstance(v, torch.Tensor) else [move(t) for t in v] for k, v in cond.items()}


def stack(samples: list[Cond]) -> Cond:
    """Conditionings of several batches -> one batch (concatenated in order)."""
    out = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[name] = torch.cat(values, dim=0)
        else:
            out[name] = [v for s in values for v in s]
    return out


def encode_captions(family: Family, pipeline, captions: list[str], device) -> Cond:
    """Training captions -> conditioning. The empty caption (caption dropout, unconditional
    images) is encoded as the source pipeline encodes its default negative prompt "", so the
    unconditional branch trains on what classifier-free guidance feeds it at sampling time
    (Lumina2 and Sana add a system prompt or instruction to prompts but not to negatives)."""
    captions = list(captions)
    cond = family.encode(pipeline, captions, device)
    keep = torch.tensor([c != "" for c in captions])
    if not bool(keep.all()):
        cond = select(cond, keep, family.encode_negative(pipeline, [""], device))
    return cond


class TextEncoder:
    """Encodes captions with the source pipeline's own text encoders (no gradients); the
    tensors come back on the CPU, like the embedding cache's."""

    def __init__(self, pipeline, source_class: str, device: torch.device):
        self.pipeline = pipeline
        self.family = family_for(source_class)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Cond:
        return to_device(encode_captions(self.family, self.pipeline, prompts, self.device), torch.device("cpu"))
