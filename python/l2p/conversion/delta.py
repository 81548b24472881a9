"""Delta checkpoints: the trainable tensors only, merged back onto the converted base."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from l2p.atomic import atomic_path
from l2p.conversion.safetensors_io import open_safetensors, read_tensors
from l2p.models import PixelTransformer2DModel

DELTA_FORMAT = "l2p-delta/1"
# Metadata key of the frozen tensors' fingerprint (see base_fingerprint).
BASE_FINGERPRINT = "base_fingerprint"
_FINGERPRINT_SCHEME = "l2p-base/1"
# Elements sampled per tensor, evenly spaced over its flattened values.
_FINGERPRINT_SAMPLES = 4096


def _config_json(model: PixelTransformer2DModel) -> str:
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=list)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """safetensors write that never leaves a half-written file at ``path``."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def base_fingerprint(model: PixelTransformer2DModel, delta_names: Iterable[str] | None = None) -> str:
    """A fingerprint of the model's frozen parameters: those not in ``delta_names`` (default:
    those without ``requires_grad``), i.e. the base a delta is merged onto.

    Two converted bases with the same config but different weights (a model and its
    fine-tune) accept each other's deltas tensor for tensor, yet the merge would splice
    trained blocks onto a middle they never saw. This tells them apart.

    sha256 over each frozen tensor's name, shape and an evenly strided sample of 4096 of its
    values, read as float32. Sampled rather than all bytes: hashing every byte costs ~32 s
    for a 24 GB bf16 model (sha256 at ~760 MB/s on one core here) plus, in the trainer, a
    copy of every frozen tensor off the GPU; the samples cost ~0.44 ms per tensor on the CPU
    (measured on 3072 x 12288 bf16 tensors), ~0.5 s for FLUX-dev's 1160, and a different base
    differs in practically every sampled value. Values, not stored bytes: the trainer
    holds the frozen tensors in float32 while the converted folder keeps the source's bf16 or
    fp16, and both upcasts are exact."""
    if delta_names is None:
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    else:
        skip = set(delta_names)
        frozen = [(n, p) for n, p in model.named_parameters() if n not in skip]
    digest = hashlib.sha256(_FINGERPRINT_SCHEME.encode())
    with torch.no_grad():
        for name, p in sorted(frozen, key=lambda item: item[0]):
            flat = p.detach().reshape(-1)
            n = flat.numel()
            if n > _FINGERPRINT_SAMPLES:
                index = torch.linspace(0, n - 1, _FINGERPRINT_SAMPLES, dtype=torch.float64).long()
                flat = flat[index.to(flat.device)]
            values = flat.to("cpu", torch.float32 if p.is_floating_point() else torch.int64)
            digest.update(f"{name}:{tuple(p.shape)};".encode())
            digest.update(values.contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def _require_pixel_model(what: str, model) -> None:
    if not isinstance(model, PixelTransformer2DModel):
        raise TypeError(f"{what} takes a PixelTransformer2DModel (from convert_to_pixel), got "
                        f"{type(model).__name__}")


def save_delta(model: PixelTransformer2DModel, path: str | os.PathLike) -> list[str]:
    """Write the trainable tensors (``requires_grad``) of ``model`` to a safetensors file,
    with the model's config and the fingerprint of its frozen tensors (``base_fingerprint``)
    in its metadata. Returns the tensor names written."""
    _require_pixel_model("save_delta", model)
    tensors = {
        name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad
    }
    if not tensors:
        raise ValueError("the model has no trainable parameters; call l2p.set_trainable(model) first")
    atomic_save_file(tensors, path, {"format": DELTA_FORMAT, "config": _config_json(model),
                                     BASE_FINGERPRINT: base_fingerprint(model)})
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


def check_delta_base(model: PixelTransformer2DModel, delta_names: Iterable[str],
                     metadata: dict[str, str], where: str = "base") -> None:
    """Refuse a delta whose frozen tensors were not ``model``'s (see ``base_fingerprint``);
    a delta written before fingerprints were recorded merges with a warning."""
    expected = metadata.get(BASE_FINGERPRINT)
    if expected is None:
        warnings.warn(f"the delta records no fingerprint of the base it was trained from (saved by an "
                      f"older l2p, or by a low-memory run that rounded its frozen tensors), so it "
                      f"cannot be checked against the {where}; make sure the {where} is the "
                      f"converted model it was trained from", stacklevel=3)
        return
    actual = base_fingerprint(model, delta_names)
    if actual != expected:
        raise ValueError(
            f"this delta was trained from another base: the {where}'s frozen tensors (fingerprint "
            f"{actual[:19]}...) are not those the delta was trained with ({expected[:19]}...), e.g. "
            f"another checkpoint with the same config; merge it onto the folder l2p convert wrote "
            f"from the source it was trained from (same weights and --seed)"
        )


def merge_delta(model: PixelTransformer2DModel, delta) -> list[str]:
    """Overwrite ``model``'s tensors with those of ``delta`` (a path or a name -> tensor
    dict), bit for bit where the model holds the delta's dtype. Returns the names merged.

    A floating delta tensor goes into a model of another floating dtype in the model's dtype
    (a float32 delta into a model loaded with torch_dtype=torch.bfloat16 is rounded to
    bfloat16, as every other tensor of that model was): the model keeps the dtype it was
    loaded in. ``l2p merge`` (merge_folder) writes the delta's values exactly."""
    _require_pixel_model("merge_delta", model)
    if isinstance(delta, (str, os.PathLike)):
        tensors, metadata = load_delta(delta)
        check_delta_config(dict(model.config), metadata)
        check_delta_base(model, tensors, metadata, where="model")
    elif isinstance(delta, Mapping):
        tensors = dict(delta)
    else:
        raise TypeError(f"merge_delta takes a delta file's path (l2p.save_delta) or a dict of name -> "
                        f"tensor, got {type(delta).__name__}")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"delta tensor {name} has no place in this model")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"delta entry {name} is a {type(value).__name__}, not a tensor")
        target = params[name]
        floats = target.is_floating_point() and value.is_floating_point()
        if target.shape != value.shape or (target.dtype != value.dtype and not floats):
            raise ValueError(
                f"delta tensor {name} is {tuple(value.shape)} {value.dtype} but the model has "
                f"{tuple(target.shape)} {target.dtype}; merge the delta into the model it was "
                f"trained from"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return sorted(tensors)
