"""Folder-level conversion and merging, behind ``l2p convert`` and ``l2p merge``.

Only safetensors are read and only the supported diffusers classes are built: no pickle, no
remote code."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from l2p.adapters import ADAPTERS, get_adapter
from l2p.conversion.convert import ConversionReport, convert_to_pixel, parameters_on_meta
from l2p.conversion.delta import check_delta_base, check_delta_config, load_delta
from l2p.conversion.safetensors_io import open_safetensors, read_tensors
from l2p.models import PixelTransformer2DModel
from l2p.models.loading import widest_dtype

PIXEL_CLASS = PixelTransformer2DModel.__name__
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _kind(folder: Path) -> str:
    """"pipeline" or "model"; a clear error for anything else."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if (folder / "config.json").is_file():
        return "model"
    raise ValueError(
        f"{folder} is not a diffusers model folder: it has neither config.json (a transformer "
        f"folder) nor model_index.json (a pipeline folder); pass the folder that "
        f"save_pretrained wrote"
    )


# diffusers' weight file names: diffusion_pytorch_model[.<variant>][-00001-of-0000N].safetensors
# (and the sharded index, .safetensors.index.json, which the glob below does not match);
# transformers' (text encoders) are the same with "model".
_WEIGHTS_NAME = "diffusion_pytorch_model"
_TRANSFORMERS_WEIGHTS_NAME = "model"


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" (found {', '.join(pickles)}: L2P never loads pickle checkpoints; re-save them "
                f"with save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise ValueError(f"{folder} has no .safetensors weights{hint}")
    return files


def _split_weight_name(name: str) -> tuple[str, str | None]:
    """(base name, variant) of a weight file name: ("diffusion_pytorch_model", "fp16") of
    diffusion_pytorch_model.fp16-00001-of-00002.safetensors, ("model", None) of model.safetensors."""
    stem = name.removesuffix(".safetensors").split("-", 1)[0]  # drop a shard suffix
    base, _, variant = stem.partition(".")
    return base, variant or None


def _variant(name: str, weights_name: str = _WEIGHTS_NAME) -> str | None:
    """The variant of a weight file name called ``weights_name``, None for the plain name."""
    base, variant = _split_weight_name(name)
    return variant if base == weights_name else None


def weights_variant(folder: Path, weights_name: str = _WEIGHTS_NAME) -> tuple[str | None, list[Path]]:
    """The ``variant=`` from_pretrained needs for ``folder`` and the files it then reads: None
    when the folder holds the plain weights (which diffusers loads by default), else the one
    variant its files carry. ``weights_name`` is "model" for a transformers model (a text
    encoder).

    diffusers looks only for diffusion_pytorch_model.safetensors unless told the variant, and
    a folder saved with save_pretrained(..., variant="fp16") holds nothing else."""
    files = _weight_files(folder)
    names = [p.name for p in files]
    plain = [p for p in files if _split_weight_name(p.name) == (weights_name, None)]
    if plain:
        return None, plain
    variants = sorted({v for v in (_variant(n, weights_name) for n in names) if v is not None})
    if len(variants) == 1:
        return variants[0], [p for p in files if _variant(p.name, weights_name) == variants[0]]
    if not variants:
        raise ValueError(f"{folder} has no {weights_name}*.safetensors weights (found {', '.join(names)}); "
                         f"pass the folder save_pretrained wrote")
    raise ValueError(f"{folder} holds weights of several variants ({', '.join(variants)}) and no plain "
                     f"{weights_name}.safetensors; copy the one variant you want into a folder of its own")


def pipeline_variant(folder: Path, skip=()) -> str | None:
    """The ``variant=`` DiffusionPipeline.from_pretrained needs for the pipeline ``folder``
    (its components but those named in ``skip``): None when each has plain weights, else the
    variant of those stored only as a variant (save_pretrained(..., variant="fp16") writes
    model.fp16.safetensors for a text encoder, diffusion_pytorch_model.fp16.safetensors for a
    VAE or transformer, and nothing else).

    diffusers takes one variant per pipeline: it then reads that variant of every component
    that has it and falls back to the plain weights of one that has only those, but refuses
    the variant where no component has it; so it is asked for only where one needs it."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    variants: dict[str, str] = {}
    for name, spec in index.items():
        if name.startswith("_") or name in skip or not isinstance(spec, list) or spec[-1] is None:
            continue
        component = folder / name
        if not component.is_dir() or not any(component.glob("*.safetensors")):
            continue  # a tokenizer or scheduler (no weights), or pickle-only (refused on load)
        weights_name = (_TRANSFORMERS_WEIGHTS_NAME if spec[0] == "transformers" else _WEIGHTS_NAME)
        variant, _ = weights_variant(component, weights_name)
        if variant is not None:
            variants[name] = variant
    if len(set(variants.values())) > 1:
        listed = ", ".join(f"{name}: {variant}" for name, variant in sorted(variants.items()))
        raise ValueError(f"the components of {folder} are stored only as different variants ({listed}); "
                         f"diffusers loads one variant per pipeline: re-save them with one variant "
                         f"(save_pretrained(..., variant=...)) or with plain weights")
    return next(iter(variants.values()), None)


def stored_dtypes(files: list[Path]) -> dict[str, torch.dtype]:
    """Every floating tensor's stored dtype, from the safetensors headers (no data read)."""
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                dtype = _DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    dtypes[key] = dtype
    return dtypes


def stored_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's stored shape, from the safetensors headers (no data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


# How many mismatching tensors a config/weights error names; one is usually enough to see
# which config entry is off, a few show whether it is one entry or the whole config.
_MISMATCHES_NAMED = 3


def check_config_fits_weights(model_type, config: dict, shapes: dict[str, tuple[int, ...]],
                              folder: Path, component: str) -> None:
    """Refuse a folder whose config.json builds tensors of other shapes than its weights hold.

    diffusers would raise a multi-line RuntimeError from deep inside from_pretrained (and
    suggest ignore_mismatched_sizes, which would silently re-initialise those tensors). The
    model is built on the meta device, so this costs no memory and reads no weights."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_type.from_config(config).state_dict().items()}
    mismatched = [(k, shapes[k], expected[k]) for k in sorted(expected)
                  if k in shapes and shapes[k] != expected[k]]
    if not mismatched:
        return
    named = "; ".join(f"{k} is stored as {tuple(s)} but the config builds {tuple(e)}"
                      for k, s, e in mismatched[:_MISMATCHES_NAMED])
    more = (f" (and {len(mismatched) - _MISMATCHES_NAMED} more)"
            if len(mismatched) > _MISMATCHES_NAMED else "")
    raise ValueError(
        f"the {component} config in {folder} does not match its weights: {named}{more}; "
        f"config.json and the weights come from different checkpoints: put back the "
        f"config.json that was saved with these weights (save_pretrained writes both)"
    )


def load_source_transformer(folder: Path):
    """A supported diffusers transformer from its save_pretrained folder (safetensors), each
    tensor in the dtype it is stored in."""
    config = _read_json(folder / "config.json")
    name = config.get("_class_name")
    if name is None:
        raise ValueError(f"{folder}/config.json has no _class_name: not a diffusers model config")
    if name == PIXEL_CLASS:
        raise ValueError(f"{folder} is already a pixel model ({PIXEL_CLASS})")
    if name not in ADAPTERS:
        raise ValueError(
            f"{name} is not supported by L2P; supported transformers: {', '.join(ADAPTERS)}"
        )
    adapter = get_adapter(name, config)
    variant, files = weights_variant(folder)
    check_config_fits_weights(adapter.source_type(), config, stored_shapes(files), folder, "transformer")
    stored = stored_dtypes(files)
    # from_pretrained takes one dtype; a checkpoint that mixes them (bf16 weights with fp32
    # norms) is read at one that holds all exactly and each tensor is put back in its own,
    # so the conversion copies (and its report verifies) the stored values bit for bit.
    model = adapter.source_type().from_pretrained(
        str(folder), use_safetensors=True, variant=variant,
        torch_dtype=widest_dtype(stored.values()) if stored else torch.float32,
    )
    if len(set(stored.values())) > 1:
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        for key, dtype in stored.items():
            if key in tensors and tensors[key].dtype != dtype:
                tensors[key].data = tensors[key].data.to(dtype)
    return model


def vae_scale_factor(vae_dir: Path) -> int | None:
    """The VAE's spatial factor, computed as the diffusers pipelines compute it."""
    if not (vae_dir / "config.json").is_file():
        return None
    config = _read_json(vae_dir / "config.json")
    if "encoder_block_out_channels" in config:  # AutoencoderDC (Sana)
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)
    if "temperal_downsample" in config:  # AutoencoderKLQwenImage / Wan
        return 2 ** len(config["temperal_downsample"])
    if "block_out_channels" in config:  # AutoencoderKL
        return 2 ** (len(config["block_out_channels"]) - 1)
    return None


# The scheduler config's word for what the model predicts, in the pixel model's words.
_SCHEDULER_PREDICTIONS = {"flow_prediction": "flow", "epsilon": "epsilon",
                          "v_prediction": "v_prediction"}


def _scheduler_prediction(scheduler_dir: Path) -> str | None:
    """What the source scheduler reads the model output as, where its config says: the same
    transformer class is trained for epsilon in one pipeline and for flow in another (PixArt
    with a flow-mode DPM-Solver, as the toy source and Sana use it)."""
    config_path = scheduler_dir / "scheduler_config.json"
    if not config_path.is_file():
        return None
    config = _read_json(config_path)
    if config.get("_class_name", "").startswith("FlowMatch"):
        return "flow"
    return _SCHEDULER_PREDICTIONS.get(config.get("prediction_type"))


def prepare_folder(out: Path) -> Path:
    """A staging folder beside ``out`` (which must not exist or be empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_folder(tmp: Path, out: Path) -> None:
    """Move the staged folder into place."""
    if out.is_dir():
        out.rmdir()  # empty, checked in prepare_folder
    os.replace(tmp, out)


def _copy_pipeline_parts(source: Path, dest: Path, skip: set[str]) -> None:
    for item in source.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy2(item, dest / item.name)


def convert_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    patch_size: int | None = None,
    head: str | dict = "detailer",
    seed: int = 0,
    published_l2p: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert a transformer folder, or a pipeline folder (written without its VAE; text
    encoders, tokenizers and scheduler copied; model_index.json names the pixel
    transformer as ["l2p", "PixelTransformer2DModel"] and records the conversion under
    "_l2p").

    ``published_l2p``: a published L2P checkpoint of this source (l2p.conversion.published_l2p)
    whose weights the pixel model takes; its patch and head layout replace ``patch_size`` and
    ``head``."""
    source, out = Path(source), Path(out)
    published = None
    if published_l2p is not None:
        from l2p.conversion.published_l2p import published_layout

        published_patch, head = published_layout(published_l2p)
        if patch_size not in (None, published_patch):
            raise ValueError(f"--patch-size {patch_size} but {published_l2p} was trained at {published_patch}; "
                             f"leave the patch size out")
        patch_size = published_patch

    def finish(pixel):
        if published_l2p is not None:
            from l2p.conversion.published_l2p import load_published_l2p

            nonlocal published
            published = load_published_l2p(pixel, published_l2p, keep_stored_dtypes=True)
            log(str(published))
        return pixel

    kind = _kind(source)
    if kind == "model":
        transformer = load_source_transformer(source)
        pixel = finish(convert_to_pixel(transformer, patch_size=patch_size, head=head, seed=seed))
        tmp = prepare_folder(out)
        try:
            pixel.save_pretrained(str(tmp), safe_serialization=True)
            finish_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return pixel.conversion_report

    index = _read_json(source / "model_index.json")
    entry = index.get("transformer")
    if not entry or entry[1] is None:
        raise ValueError(
            f"{source}/model_index.json has no transformer; L2P converts transformer "
            f"pipelines ({', '.join(ADAPTERS)})"
        )
    transformer = load_source_transformer(source / "transformer")
    factor = vae_scale_factor(source / "vae")
    pixel = finish(convert_to_pixel(
        transformer, vae_scale_factor=factor, patch_size=patch_size, head=head, seed=seed
    ))
    tmp = prepare_folder(out)
    try:
        _copy_pipeline_parts(source, tmp, skip={"vae", "transformer", "model_index.json"})
        pixel.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        index["transformer"] = ["l2p", PIXEL_CLASS]
        if "vae" in index:
            index["vae"] = [None, None]
        index["_l2p"] = {
            "source_pipeline": index.get("_class_name"),
            "source_transformer": type(transformer).__name__,
            "pixel_transformer": PIXEL_CLASS,
            "patch_size": pixel.config.patch_size,
            "vae_scale_factor": factor,
            "prediction": _scheduler_prediction(source / "scheduler") or pixel.prediction,
            "output_sign": pixel.output_sign,
        }
        if published is not None:
            index["_l2p"]["weights"] = {"published_l2p": [Path(f).name for f in published.files]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        finish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pixel.conversion_report


def _pixel_model_dir(base: Path) -> Path:
    if _kind(base) == "pipeline":
        entry = _read_json(base / "model_index.json").get("transformer")
        if not entry or entry[1] != PIXEL_CLASS:
            raise ValueError(
                f"{base} is not a converted pipeline (its transformer is {entry}); run l2p "
                f"convert first"
            )
        return base / "transformer"
    return base


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        state.update(read_tensors(path))
    return state


def _dtype_names(tensors) -> str:
    return "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))


def merge_folder(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike,
                 *, log: Callable[[str], None] = print) -> list[str]:
    """Write ``base`` (a converted model or pipeline folder) with the delta's tensors in
    place, bit-identical to the model the delta was saved from. Returns the merged names.

    A delta tensor in another floating dtype than the base stores (the trainer keeps what
    trains in float32 over a bfloat16 or float16 base) is written as the delta holds it, so
    the merged folder is the trained model, not a rounding of it; ``log`` gets one line
    saying so. Loading it with ``torch_dtype`` gives one dtype throughout."""
    base, out = Path(base), Path(out)
    model_dir = _pixel_model_dir(base)
    config = _read_json(model_dir / "config.json")
    if config.get("_class_name") != PIXEL_CLASS:
        raise ValueError(
            f"{model_dir} holds {config.get('_class_name')}, not a pixel model; merge onto the "
            f"folder l2p convert wrote"
        )
    tensors, metadata = load_delta(delta)
    check_delta_config(config, metadata)
    state = load_state(model_dir)
    other_dtype: list[str] = []
    for name, value in tensors.items():
        if name not in state:
            raise ValueError(f"delta tensor {name} has no place in {model_dir}")
        stored = state[name]
        floats = stored.is_floating_point() and value.is_floating_point()
        if stored.shape != value.shape or (stored.dtype != value.dtype and not floats):
            raise ValueError(
                f"delta tensor {name} is {tuple(value.shape)} {value.dtype} but {model_dir} has "
                f"{tuple(stored.shape)} {stored.dtype}; merge the delta onto the folder l2p "
                f"convert wrote for the model it was trained from"
            )
        if stored.dtype != value.dtype:
            other_dtype.append(name)
    if other_dtype:
        log(f"{len(other_dtype)} of the delta's {len(tensors)} tensors are "
            f"{_dtype_names(tensors[n] for n in other_dtype)} where {model_dir} stores "
            f"{_dtype_names(state[n] for n in other_dtype)}: written as the delta holds them, so "
            f"the merged model is the trained one exactly (from_pretrained(..., torch_dtype=...) "
            f"loads it in one dtype)")
    state.update(tensors)
    with parameters_on_meta():  # every parameter is about to be assigned from `state`
        model = PixelTransformer2DModel.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    check_delta_base(model, tensors, metadata)
    tmp = prepare_folder(out)
    try:
        if model_dir is base:
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            _copy_pipeline_parts(base, tmp, skip={"transformer"})
            model.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        finish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(tensors)
