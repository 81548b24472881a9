"""Captions -> the keyword arguments each source family's transformer takes.

One small entry per family says how its pipeline encodes prompts (``encode_prompt``, the
source's own text encoders and truncation) and how the transformer is called with those
tensors, the noisy image and the time, in the convention its pipeline uses. The tensors of one
caption are a dict of named tensors (batch-first) or per-sample lists, the same names the text
embedding cache stores, so training with the cache never loads a text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Cond = dict[str, Any]


@dataclass(frozen=True)
class Family:
    encode: Callable[[Any, list[str], torch.device], Cond]
    # (cond, x_t, timesteps, model, guidance) -> transformer kwargs (x_t included); timesteps
    # are the scheduler's (sigma x 1000 for flow sources, integer steps for DDPM ones), which
    # each family rescales as its pipeline does.
    call: Callable[..., dict]


def _pixart_encode(pipe, prompts, device):
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _pixart_call(cond, x_t, times, model, guidance):
    return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                encoder_attention_mask=cond["prompt_attention_mask"], timestep=times,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _sd3_encode(pipe, prompts, device):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _sd3_call(cond, x_t, times, model, guidance):
    return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"], timestep=times)


def _flux_encode(pipe, prompts, device):
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _flux_call(cond, x_t, times, model, guidance):
    from diffusers import FluxPipeline

    p = model.config.patch_size
    rows, cols = x_t.shape[-2] // p, x_t.shape[-1] // p
    embeds = cond["prompt_embeds"]
    img_ids = FluxPipeline._prepare_latent_image_ids(x_t.shape[0], rows, cols, x_t.device, x_t.dtype)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    kwargs = dict(hidden_states=x_t, encoder_hidden_states=embeds,
                  pooled_projections=cond["pooled_prompt_embeds"], timestep=times / 1000.0,
                  img_ids=img_ids, txt_ids=txt_ids)
    if model.config.source_config.get("guidance_embeds", False):
        kwargs["guidance"] = torch.full((x_t.shape[0],), float(guidance), device=x_t.device)
    return kwargs


def _sana_encode(pipe, prompts, device):
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _sana_call(cond, x_t, times, model, guidance):
    return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                encoder_attention_mask=cond["prompt_attention_mask"], timestep=times)


def _lumina2_call(cond, x_t, times, model, guidance):
    return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                encoder_attention_mask=cond["prompt_attention_mask"], timestep=1.0 - times / 1000.0)


def _zimage_encode(pipe, prompts, device):
    embeds, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    return {"prompt_embeds": list(embeds)}  # variable-length per caption


def _zimage_call(cond, x_t, times, model, guidance):
    return dict(x=x_t, t=(1000.0 - times) / 1000.0, cap_feats=list(cond["prompt_embeds"]))


FAMILIES: dict[str, Family] = {
    "PixArtTransformer2DModel": Family(_pixart_encode, _pixart_call),
    "SD3Transformer2DModel": Family(_sd3_encode, _sd3_call),
    "FluxTransformer2DModel": Family(_flux_encode, _flux_call),
    "SanaTransformer2DModel": Family(_sana_encode, _sana_call),
    "Lumina2Transformer2DModel": Family(_sana_encode, _lumina2_call),
    "ZImageTransformer2DModel": Family(_zimage_encode, _zimage_call),
}


def family_for(source_class: str) -> Family:
    if source_class not in FAMILIES:
        raise ValueError(f"the trainer has no text conditioning for {source_class}; trainable "
                         f"families: {', '.join(FAMILIES)}")
    return FAMILIES[source_class]


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


class TextEncoder:
    """Encodes captions with the source pipeline's own text encoders (no gradients); the
    tensors come back on the CPU, like the embedding cache's."""

    def __init__(self, pipeline, source_class: str, device: torch.device):
        self.pipeline = pipeline
        self.family = family_for(source_class)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Cond:
        return to_device(self.family.encode(self.pipeline, list(prompts), self.device), torch.device("cpu"))
