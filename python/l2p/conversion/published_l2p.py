"""The published L2P checkpoints (Z-Image L2P from the paper's authors) as l2p pixel models.

What such a checkpoint holds, as the public ports that load it read it (ComfyUI's
``comfy/ldm/lumina/l2p.py`` and others), for a pixel patch P = 2^L:

- the Z-Image transformer under diffusers' names (``layers.N...``, ``noise_refiner``,
  ``context_refiner``, ``t_embedder``, ``cap_embedder``, the pad tokens);
- the pixel patch embedding ``all_x_embedder.{P}-1``: Linear(P * P * 3 -> dim) over each patch
  flattened as (row, column, channel), which is how ZImageTransformer2DModel patchifies;
- the decoder ``local_decoder.*``, fed the last block's output (no final norm): per level
  ``enc{i}.0`` a 3x3 conv + SiLU then 2x2 max pooling; ``bottleneck.0`` a 1x1 conv + SiLU on
  [pooled image, token features]; per level coarse to fine ``up{i}.1`` a 3x3 conv after 2x
  nearest upsampling and ``dec{i}.0`` a 3x3 conv + SiLU on [upsampled, skip]; ``out_conv`` a
  1x1 conv. It predicts x0 - noise, the sign ZImageTransformer2DModel's output has.

l2p's Detailer Head with ``pool="max", up_convs=True`` and ``features="blocks"`` is that
decoder (PUBLISHED_HEAD). The head learns the scheduler's model output (noise - x0) and the
pixel model puts Z-Image's sign on it, so the decoder's output conv enters negated (exact);
the pixel embedding enters in l2p's (D, 3, P, P) layout. Everything else keeps its name under
``transformer.``. A final layer in the file (``all_final_layer.*``) is not read: the published
model does not use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from l2p.conversion.safetensors_io import open_safetensors, read_tensors

# The head layout of the published decoder; its widths come from the checkpoint.
PUBLISHED_HEAD = {"type": "detailer", "pool": "max", "up_convs": True, "features": "blocks"}
SUPPORTED_SOURCES = ("ZImageTransformer2DModel",)

_EMBEDDER = re.compile(r"^all_x_embedder\.(\d+)-(\d+)\.(weight|bias)$")
_DECODER = re.compile(r"^local_decoder\.(?:(enc|dec|up)(\d+)\.(\d+)|(bottleneck)\.0|(out_conv))\.(weight|bias)$")


@dataclass
class PublishedLoad:
    """What ``load_published_l2p`` did."""

    files: list[str]
    tensors: int = 0                                   # assigned to the model
    ignored: list[str] = field(default_factory=list)   # in the file, not used by the model
    rounded: int = 0                                   # stored wider than the model's dtype

    def __str__(self) -> str:
        text = f"loaded {self.tensors} tensors from {', '.join(self.files)}"
        if self.ignored:
            text += f"; not used: {len(self.ignored)} ({', '.join(self.ignored[:3])}{', ...' if len(self.ignored) > 3 else ''})"
        if self.rounded:
            text += f"; {self.rounded} stored wider than the model's dtype were rounded to it"
        return text


def checkpoint_files(path: str | Path) -> list[Path]:
    """A .safetensors file, or every .safetensors file of a folder (a sharded checkpoint)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .safetensors files; pass the L2P checkpoint file or "
                                    f"the folder of its shards")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"L2P checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoints are read from .safetensors files only (no pickle)")
    return [path]


# Prefixes that other tools put before every key of a model file (ComfyUI's single-file
# checkpoints, trainer state dicts); a checkpoint whose every key has one is read without it.
_WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "dit.", "transformer.")


@dataclass
class _Headers:
    """What the headers of a checkpoint's files say, read once: each tensor's shape and the
    file holding it, by key without the prefix every stored key carries."""

    shapes: dict[str, tuple[int, ...]]
    stored: dict[str, tuple[Path, str]]  # key -> (file, the key as stored)


def _headers(files: list[Path]) -> _Headers:
    shapes, where = {}, {}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
                where[key] = path
    prefix = _wrapper_prefix(shapes)
    return _Headers({key[len(prefix):]: shape for key, shape in shapes.items()},
                    {key[len(prefix):]: (path, key) for key, path in where.items()})


def _wrapper_prefix(keys) -> str:
    return next((p for p in _WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")


def published_layout(path: str | Path) -> tuple[int, dict]:
    """(pixel patch P, head config) of a published L2P checkpoint, from its headers alone."""
    return _layout(path, _headers(checkpoint_files(path)).shapes)


def _layout(path, shapes: dict[str, tuple[int, ...]]) -> tuple[int, dict]:
    embedders = {(int(m[1]), int(m[2])) for k in shapes if (m := _EMBEDDER.match(k))}
    if not any(k.startswith("local_decoder.") for k in shapes) or len(embedders) != 1:
        raise ValueError(f"{path} is not an L2P checkpoint of the published layout (one pixel patch "
                         f"embedding all_x_embedder.P-1 and a local_decoder): found "
                         f"{len(embedders)} patch embeddings and "
                         f"{sum(k.startswith('local_decoder.') for k in shapes)} decoder tensors")
    (patch, frames), = embedders
    levels = patch.bit_length() - 1
    if frames != 1 or patch != 2**levels:
        raise ValueError(f"{path}: pixel patch embedding all_x_embedder.{patch}-{frames}; l2p reads "
                         f"single-frame checkpoints with a power-of-two patch")
    try:
        channels = [shapes[f"local_decoder.enc{i}.0.weight"][0] for i in range(1, levels + 1)]
    except KeyError as missing:
        raise ValueError(f"{path}: a patch of {patch} needs {levels} decoder levels but {missing.args[0]} "
                         f"is missing") from None
    return patch, {**PUBLISHED_HEAD, "channels": channels}


def _our_name(key: str, levels: int, input_module: str) -> tuple[str | None, str]:
    """(l2p name or None when not used, how the value changes: "", "negate", "embed")."""
    m = _EMBEDDER.match(key)
    if m:
        return f"transformer.{input_module}.{m[3]}", "embed" if m[3] == "weight" else ""
    m = _DECODER.match(key)
    if m:
        kind, level, index, bottleneck, out_conv, param = m.groups()
        if bottleneck:
            return f"head.fuse.{param}", ""
        if out_conv:
            return f"head.proj_out.{param}", "negate"
        level, index = int(level), int(index)
        expected = 1 if kind == "up" else 0  # Sequential[Upsample, Conv] / [Conv, SiLU]
        if index != expected or not 1 <= level <= levels:
            return None, ""
        if kind == "enc":
            return f"head.encoder.{level - 1}.{param}", ""
        group = "up" if kind == "up" else "decoder"
        return f"head.{group}.{levels - level}.{param}", ""
    if key.startswith(("all_final_layer.", "local_decoder.")):
        return None, ""
    return f"transformer.{key}", ""


def load_published_l2p(model, path: str | Path, *, keep_stored_dtypes: bool = False) -> PublishedLoad:
    """Assign a published L2P checkpoint to ``model`` (a PixelTransformer2DModel converted from
    the same source with PUBLISHED_HEAD and the checkpoint's patch). Every tensor the model has
    must come from the file, with its shape; nothing is changed unless all of them do.

    Each tensor takes the model parameter's dtype (those stored wider are counted in
    ``rounded``), or with ``keep_stored_dtypes`` the dtype the file stores it in, so that a
    model about to be saved holds the checkpoint exactly (the published files mix float32 and
    bfloat16); such a model is for saving, not for running."""
    source_class = model.config.source_class
    if source_class not in SUPPORTED_SOURCES:
        raise ValueError(f"published L2P checkpoints exist for {', '.join(SUPPORTED_SOURCES)}; this model "
                         f"was converted from {source_class}")
    files = checkpoint_files(path)
    headers = _headers(files)
    patch, head = _layout(path, headers.shapes)
    if model.config.patch_size != patch or model.config.head_config != head:
        raise ValueError(f"the model has patch {model.config.patch_size} and head {model.config.head_config} "
                         f"but {path} needs patch {patch} and head {head}: convert with "
                         f"l2p convert --published-l2p {path}")
    levels = patch.bit_length() - 1
    params = dict(model.named_parameters())
    plan, ignored = {}, []
    for key, shape in headers.shapes.items():
        name, how = _our_name(key, levels, model.adapter.input_module)
        if name is None or name not in params:
            ignored.append(key)
            continue
        want = tuple(params[name].shape)
        # The embedding's (D, P*P*3) enters as (D, 3, P, P).
        have = (shape[0], 3, patch, patch) if how == "embed" and shape[1:] == (patch * patch * 3,) else shape
        if tuple(have) != want:
            raise ValueError(f"{path}: {key} is {shape} but the model's {name} is {want}: the checkpoint "
                             f"and the source folder are different models (sizes)")
        plan[name] = (key, how)
    missing = sorted(set(params) - set(plan))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors the model needs ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}): is it a published L2P checkpoint of this source?")

    load = PublishedLoad([str(f) for f in files], ignored=sorted(ignored))
    with torch.no_grad():
        for file in files:
            wanted = {headers.stored[key][1]: name for name, (key, _) in plan.items()
                      if headers.stored[key][0] == file}
            for key, value in read_tensors(file, list(wanted)).items():
                name = wanted[key]
                how = plan[name][1]
                if how == "negate":
                    value = -value
                elif how == "embed":  # (D, P*P*3) in (row, column, channel) order -> (D, 3, P, P)
                    value = value.reshape(value.shape[0], patch, patch, 3).permute(0, 3, 1, 2)
                param = params[name]
                if keep_stored_dtypes:
                    param.data = value.contiguous()
                else:
                    if value.is_floating_point() and torch.finfo(value.dtype).bits > torch.finfo(param.dtype).bits:
                        load.rounded += 1
                    param.copy_(value)
                load.tensors += 1
    return load

