"""Delta checkpoints: the trainable tensors only, merged back onto the converted base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from l2p.atomic import atomic_path
from l2p.conversion.safetensors_io import open_safetensors, read_tensors
from l2p.models import PixelTransformer2DModel

DELTA_FORMAT = "l2p-delta/1"


def _config_json(model: PixelTransformer2DModel) -> str:
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=list)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """safetensors write that never leaves a half-written file at ``path``."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_delta(model: PixelTransformer2DModel, path: str | os.PathLike) -> list[str]:
    """Write the trainable tensors (``requires_grad``) of ``model`` to a safetensors file,
    with the model's config in its metadata. Returns the tensor names written."""
    tensors = {
        name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad
    }
    if not tensors:
        raise ValueError("the model has no trainable parameters; call l2p.set_trainable(model) first")
    atomic_save_file(tensors, path, {"format": DELTA_FORMAT, "config": _config_json(model)})
    return sorted(tensors)


def load_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a delta file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist")
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != DELTA_FORMAT:
        raise ValueError(
            f"{path} is not an l2p delta (format {metadata.get('format')!r}); write one "
            f"with l2p.save_delta"
        )
    return read_tensors(path), metadata


def check_delta_config(base_config: dict, metadata: dict[str, str], where: str = "base") -> None:
    """Refuse a delta trained from a differently configured model."""
    if "config" not in metadata:
        return
    delta_config = json.loads(metadata["config"])
    base = json.loads(json.dumps({k: v for k, v in base_config.items() if not k.startswith("_")},
                                 sort_keys=True, default=list))
    differing = sorted(k for k in set(base) | set(delta_config) if base.get(k) != delta_config.get(k))
    if differing:
        raise ValueError(
            f"the delta was saved from a model whose {', '.join(differing)} differ from the "
            f"{where}'s; merge it onto the model it was trained from"
        )


def merge_delta(model: PixelTransformer2DModel, delta) -> list[str]:
    """Overwrite ``model``'s tensors with those of ``delta`` (a path or a name -> tensor
    dict), bit for bit. Returns the names merged."""
    if isinstance(delta, (str, os.PathLike)):
        tensors, metadata = load_delta(delta)
        check_delta_config(dict(model.config), metadata)
    else:
        tensors = dict(delta)
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"delta tensor {name} has no place in this model")
        target = params[name]
        if target.shape != value.shape or target.dtype != value.dtype:
            raise ValueError(
                f"delta tensor {name} is {tuple(value.shape)} {value.dtype} but the model has "
                f"{tuple(target.shape)} {target.dtype}"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return sorted(tensors)
