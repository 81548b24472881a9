"""The source checkpoint as the trainer sees it: its transformer, its scheduler config, its
VAE factor and (unless the text-embedding cache replaces them) its text encoders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2p.conversion.folders import vae_scale_factor


@dataclass
class Source:
    path: Path
    transformer_class: str
    scheduler_config: dict[str, Any]
    vae_scale_factor: int | None

    def load_transformer(self, dtype: torch.dtype = torch.float32):
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        return cls.from_pretrained(str(self.path / "transformer"), torch_dtype=dtype)

    def load_text_pipeline(self, device: torch.device):
        """The pipeline with its text encoders and tokenizers only (no transformer, no VAE)."""
        from diffusers import DiffusionPipeline

        index = json.loads((self.path / "model_index.json").read_text())
        skip = {name: None for name in ("transformer", "vae") if name in index}
        # Text encoders run without gradients: bf16 on GPUs halves their memory (T5-XXL: 9 GB).
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(str(self.path), torch_dtype=dtype, **skip)
        pipe.set_progress_bar_config(disable=True)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.to(device).eval().requires_grad_(False)
        return pipe


def resolve_source_path(name: str) -> Path:
    if name == "toy":
        try:
            from l2p.toy.source import SHIPPED_SOURCE_DIR
        except ImportError:
            SHIPPED_SOURCE_DIR = None
        if SHIPPED_SOURCE_DIR is None or not (Path(SHIPPED_SOURCE_DIR) / "model_index.json").is_file():
            raise ValueError("the built-in toy source model is not available in this install yet "
                             "(`l2p toy train-source` builds it); set model.source to a diffusers "
                             "pipeline folder (--set model.source=DIR)")
        return Path(SHIPPED_SOURCE_DIR)
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
