"""The source checkpoint as the trainer sees it: its transformer, its scheduler config, its
VAE factor and (unless the text-embedding cache replaces them) its text encoders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2p.conversion.folders import pipeline_variant, stored_dtypes, vae_scale_factor, weights_variant
from l2p.models.loading import cast_loaded


@dataclass
class Source:
    path: Path
    transformer_class: str
    scheduler_config: dict[str, Any]
    vae_scale_factor: int | None

    def load_transformer(self, dtype: torch.dtype = torch.float32):
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        variant, _ = weights_variant(self.path / "transformer")
        model = cls.from_pretrained(str(self.path / "transformer"), torch_dtype=dtype, variant=variant,
                                    use_safetensors=True)
        return cast_loaded(model, dtype)

    def loads_exactly(self, dtype: torch.dtype) -> bool:
        """Whether reading the transformer in ``dtype`` keeps every stored value: each tensor is
        stored in ``dtype``, or ``dtype`` is float32 and they are 16- or 32-bit floats."""
        _, files = weights_variant(self.path / "transformer")
        wider_ok = (torch.float16, torch.bfloat16, torch.float32) if dtype == torch.float32 else (dtype,)
        return all(d in wider_ok for d in stored_dtypes(files).values())

    def load_vae_encoder(self, dtype: torch.dtype = torch.float32):
        """The source's VAE without its decoder (what ``encode_latents`` needs), frozen."""
        import diffusers

        index = json.loads((self.path / "model_index.json").read_text())
        if not index.get("vae") or index["vae"][1] is None:
            raise ValueError(f"{self.path} has no VAE; align.weight > 0 and model.embed_init=vae encode "
                             "images with the source's VAE: use the source pipeline folder with its vae/")
        variant, _ = weights_variant(self.path / "vae")
        vae = getattr(diffusers, index["vae"][1]).from_pretrained(
            str(self.path / "vae"), torch_dtype=dtype, variant=variant, use_safetensors=True)
        cast_loaded(vae, dtype)
        # Empty stand-ins, not None: encoding never runs them, but Qwen-Image's VAE counts the
        # decoder's layers when it resets its caches; a decode fails at once.
        for name in ("decoder", "post_quant_conv"):
            if getattr(vae, name, None) is not None:
                setattr(vae, name, torch.nn.Module())
        return vae.eval().requires_grad_(False)

    def load_text_pipeline(self, device: torch.device):
        """The pipeline with its text encoders and tokenizers only (no transformer, no VAE)."""
        from diffusers import DiffusionPipeline

        index = json.loads((self.path / "model_index.json").read_text())
        skip = {name: None for name in ("transformer", "vae") if name in index}
        # Text encoders run without gradients: bf16 on GPUs halves their memory (T5-XXL: 9 GB).
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(str(self.path), torch_dtype=dtype, use_safetensors=True,
                                                 variant=pipeline_variant(self.path, skip), **skip)
        pipe.set_progress_bar_config(disable=True)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.to(device).eval().requires_grad_(False)
        return pipe


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Clean images (B, 3, H, W) in [-1, 1] -> the latents (B, C, h, w) the source transformer
    was trained on: the encoder's mean, normalised as the pipeline reads the VAE config
    (``(z - shift_factor) * scaling_factor``; Qwen-Image's VAE: ``(z - latents_mean) /
    latents_std``, its frame axis of one dropped)."""
    config = vae.config
    video = "temperal_downsample" in config  # AutoencoderKLQwenImage takes (B, C, frames, H, W)
    encoded = vae.encode(pixels.to(vae.dtype).unsqueeze(2) if video else pixels.to(vae.dtype))
    z = (encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent).float()
    if video:
        z = z.squeeze(2)
    if config.get("latents_mean") is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config["latents_mean"], device=z.device).view(shape)
        std = torch.tensor(config["latents_std"], device=z.device).view(shape)
        return (z - mean) / std
    return (z - (config.get("shift_factor") or 0.0)) * config["scaling_factor"]


def resolve_source_path(name: str) -> Path:
    """model.source as a folder: "toy" is the toy source shipped inside the package."""
    from l2p.data.generate import TOY_SOURCE, resolve_source

    if name == TOY_SOURCE:
        try:
            return resolve_source(name)
        except FileNotFoundError as exc:
            raise ValueError(f"{exc}; or set model.source to a diffusers pipeline folder "
                             "(--set model.source=DIR)") from None
    return Path(name)


def open_source(name: str) -> Source:
    path = resolve_source_path(name)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                                "model.source must be a folder written by save_pretrained, or 'toy'")
    index = json.loads(index_file.read_text())
    if "transformer" not in index or not index["transformer"] or index["transformer"][1] is None:
        raise ValueError(f"{path} has no transformer component ({index.get('_class_name')}); L2P "
                         "migrates transformer pipelines such as PixArt, SD3, FLUX, Sana, Z-Image")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise FileNotFoundError(f"{sched_file} not found: the trainer uses the source scheduler's "
                                "config for its objective")
    scheduler_config = json.loads(sched_file.read_text())
    # The same factor `l2p convert` reads, so the trainer's pixel patch is the converted one's.
    return Source(path, index["transformer"][1], scheduler_config, vae_scale_factor(path / "vae"))
