"""Rendering the synthetic training set with the source pipeline: resumable, rank-parallel,
with one ``metadata.csv`` (``file_name,text,...``, the layout the official code reads).

Resume and merge design. Every image is fully determined by (prompt index, image index): its
file name ``images/PPPP/PPPPPPP_III.png`` and its seed ``derive_seed(seed, p, i)``. A PNG is
written to a hidden temporary name in its final folder and moved into place with
``os.replace``, so a file with the final name is complete unless the machine itself went
down before the data reached the disk; re-running skips every image whose PNG is complete
(it has the PNG signature and end chunk) and renders the rest. The image's own record
(prompt, seed, size, source, steps, guidance) is stored inside the PNG as an iTXt chunk, so
image and record land in one atomic step and can never disagree. ``metadata.csv`` is never
appended to: it is rebuilt (atomically) from the PNGs at the end of a run, reusing the rows
of the previous ``metadata.csv`` whose files still exist and reading only the headers of new
PNGs. A crash at any instant therefore loses at most the images in flight, never leaves a
half-written file or a duplicate row, and an interrupted run's metadata is restored by the
next run or by ``rebuild_metadata``. Under torchrun each rank renders the jobs ``j % world_size == rank``;
after a barrier rank 0 rebuilds the one ``metadata.csv`` from everything on disk.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from l2p.atomic import atomic_path, write_text
from l2p.data.prompts import read_prompts
from l2p.data.textfiles import read_csv

logger = logging.getLogger(__name__)

METADATA_COLUMNS = ("file_name", "text", "seed", "height", "width", "source", "steps", "guidance",
                    "prompt_index", "image_index")
MANIFEST = "generation.json"
PNG_RECORD_KEY = "l2p"
TOY_SOURCE = "toy"


def resolve_source(source: str | os.PathLike) -> Path:
    """The local diffusers pipeline folder that ``--source`` names.

    ``"toy"`` is l2p's built-in toy source (ShapesWorld, shipped inside the package).
    Anything else must be a folder saved with ``save_pretrained`` (it has ``model_index.json``).
    """
    if str(source) == TOY_SOURCE:
        from l2p.toy.source import SHIPPED_SOURCE_DIR

        if not (SHIPPED_SOURCE_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the built-in toy source is missing from this install ({SHIPPED_SOURCE_DIR}); "
                "train it with `l2p toy train-source`"
            )
        return SHIPPED_SOURCE_DIR
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source pipeline folder {str(path)!r} does not exist (models are "
                                "never downloaded: save or download the pipeline first)")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json); "
                         "pass the folder written by DiffusionPipeline.save_pretrained")
    return path


# Files of a component folder identified by name and size only: weights that load_pipeline never
# reads (it loads safetensors only), too big to hash on every run.
_SIZE_ONLY_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".onnx_data", ".msgpack", ".h5"}
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # safetensors itself refuses headers above 100 MB
_TENSOR_SAMPLE_BYTES = 64


def _safetensors_fingerprint(path: Path) -> bytes:
    """File size, the JSON header (names, dtypes, shapes, offsets) and the first and last
    bytes of each tensor's data. The header alone cannot tell two trainings of one
    architecture apart (same names, shapes and offsets), so a few bytes of every tensor are
    read too: a retrained or fine-tuned model differs in them, and reading ~128 bytes a
    tensor stays cheap for multi-GB files."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise ValueError(f"{path} is not a readable safetensors file (bad header length); "
                             "re-save the pipeline with save_pretrained(safe_serialization=True)")
        header = f.read(length)
        try:
            tensors = json.loads(header)
        except ValueError:
            raise ValueError(f"{path} is not a readable safetensors file (its header is not JSON); "
                             "re-save the pipeline with save_pretrained(safe_serialization=True)") from None
        parts = [size.to_bytes(8, "little"), header]
        spans = sorted(tuple(spec["data_offsets"]) for name, spec in tensors.items() if name != "__metadata__")
        for begin, end in spans:
            for start in {begin, max(begin, end - _TENSOR_SAMPLE_BYTES)}:
                f.seek(8 + length + start)
                parts.append(f.read(min(_TENSOR_SAMPLE_BYTES, end - start)))
    return b"".join(parts)


def source_digest(source: str | os.PathLike) -> str:
    """A sha256 that identifies a pipeline folder by its content, not its path, and costs
    little for multi-GB pipelines: model_index.json and, in every component folder it names,
    the small files (configs, tokenizer files) in full and each safetensors file by
    :func:`_safetensors_fingerprint`. The same weights copied elsewhere give the same digest;
    another model saved into the same folder gives another. Files outside the component
    folders (a training record, a README) are left out: they do not change the images."""
    root = resolve_source(source)
    digest = hashlib.sha256()

    def add(kind: str, name: str, data: bytes) -> None:
        digest.update(f"{kind} {name} {len(data)}\n".encode())
        digest.update(data)

    index_bytes = (root / "model_index.json").read_bytes()
    add("file", "model_index.json", index_bytes)
    index = json.loads(index_bytes)
    for component in sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)):
        folder = root / component
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith(".") for part in rel.parts):
                continue  # temporary files of an interrupted save, .cache folders
            name = rel.as_posix()
            if path.suffix == ".safetensors":
                add("safetensors", name, _safetensors_fingerprint(path))
            elif path.suffix in _SIZE_ONLY_SUFFIXES or path.stat().st_size > 64 * 2**20:
                add("size", name, str(path.stat().st_size).encode())
            else:
                add("file", name, path.read_bytes())
    return digest.hexdigest()


def load_pipeline(source: str | os.PathLike, *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, **components):
    """``DiffusionPipeline.from_pretrained`` on a local folder: no download, no remote code,
    safetensors only, components stored only as a variant (fp16) read as such.
    ``components`` overrides pipeline parts (``transformer=None`` skips one)."""
    from diffusers import DiffusionPipeline

    from l2p.conversion.folders import pipeline_variant

    from l2p.sample.pipeline import L2PPipeline, is_pixel_pipeline_folder

    path = resolve_source(source)
    if not components and is_pixel_pipeline_folder(path):
        # A converted (L2P) folder renders with the pixel model: no VAE, the pixel sampler.

        pipe = L2PPipeline.from_pretrained(path, torch_dtype=None if dtype == torch.float32 else dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    if dtype != torch.float32:  # float32 is the default; diffusers >= 0.36 renames the argument
        components["torch_dtype"] = dtype
    variant = pipeline_variant(path, skip={name for name, value in components.items() if value is None})
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                             variant=variant, **components)
    from diffusers import ModelMixin

    from l2p.models.loading import cast_loaded

    for module in pipe.components.values():
        if isinstance(module, ModelMixin):  # transformers' models honour torch_dtype themselves
            cast_loaded(module, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prompts_digest(prompts: list[str]) -> str:
    """The sha256 a manifest records of the prompt list: of the prompts joined by newlines, as
    manifests have always recorded it, unless a prompt holds a newline itself (a CSV or JSONL
    prompt can): then of the list as JSON, or ["a\nb", "c"] and ["a", "b\nc"] would agree."""
    if any("\n" in p for p in prompts):
        return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def image_name(prompt_index: int, image_index: int) -> str:
    """The file name (relative to the output folder) of one image; 1000 prompts a folder."""
    return f"images/{prompt_index // 1000:04d}/{prompt_index:07d}_{image_index:03d}.png"


def derive_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed that depends only on (seed, prompt index, image index), not on the rank,
    batch or order in which the image is rendered."""
    hi, lo = np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


@dataclass
class GenerationConfig:
    """Everything that decides which images ``generate_images`` writes."""

    source: str
    prompts: str
    out: str
    images_per_prompt: int = 2
    steps: int | None = None  # None: the pipeline's default
    guidance: float | None = None  # None: the pipeline's default
    height: int = 1024
    width: int = 1024
    seed: int = 0
    batch_size: int = 4
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU


@dataclass
class GenerationSummary:
    rank: int
    world_size: int
    planned: int = 0  # images in this rank's slice
    existing: int = 0  # already on disk, skipped
    rendered: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metadata_rows: int | None = None  # set on the rank that rebuilt metadata.csv
    beyond: int = 0  # images kept on disk with an image index >= images_per_prompt
    images_per_prompt: int = 0
    # Agreed by every rank at the end of the run: the images that failed on all ranks
    # together (None without a process group), and the ranks where every image tried failed
    # (a broken rank, not an unlucky prompt: the whole run fails; this rank alone without a
    # process group).
    failed_all_ranks: int | None = None
    broken_ranks: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"rank {self.rank}/{self.world_size}: {self.rendered} rendered, {self.existing} already "
                f"present, {len(self.failed)} failed of {self.planned} in {self.seconds:.1f} s")
        if self.failed:
            more = ", ..." if len(self.failed) > 5 else ""
            text += f" (failed: {', '.join(self.failed[:5])}{more}; re-run to retry them)"
        if self.metadata_rows is not None:
            text += f"; metadata.csv has {self.metadata_rows} rows"
        if self.failed_all_ranks is not None and self.world_size > 1:
            text += f"; {self.failed_all_ranks} failed on all ranks"
        if self.broken_ranks:
            text += f"; every image failed on rank {', '.join(map(str, self.broken_ranks))}: the run failed"
        if self.beyond:
            # Kept (they are valid images of the same settings) but the manifest now says fewer.
            text += (f"; {self.beyond} images beyond --images-per-prompt {self.images_per_prompt} from an "
                     "earlier run were kept (they stay in metadata.csv; delete them to drop them)")
        return text


# --------------------------------------------------------------------------- ranks

@dataclass
class _Ranks:
    rank: int
    world_size: int
    local_rank: int
    joined: bool = False  # part of a torch.distributed job (else: no barrier is possible)
    group: object | None = None
    owns_process_group: bool = False

    def barrier(self) -> None:
        if self.joined and self.world_size > 1:
            torch.distributed.barrier(group=self.group)

    def all_gather(self, value) -> list:
        """``value`` of every rank, by rank (a collective: every rank must call it)."""
        if not (self.joined and self.world_size > 1):
            return [value]
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value, group=self.group)
        return values

    def close(self) -> None:
        if self.owns_process_group:
            torch.distributed.destroy_process_group()


def _join_ranks() -> _Ranks:
    """Rank and world size from torch.distributed when initialised, else from torchrun's
    environment (WORLD_SIZE, RANK, LOCAL_RANK), joining a gloo group for the final barrier.
    The barrier gets a long timeout of its own because ranks may finish hours apart."""
    import torch.distributed as dist

    from l2p.torchrun import DistEnv

    env = DistEnv.from_torchrun()
    long_wait = timedelta(days=7)
    if dist.is_available() and dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=long_wait)
        local_rank = env.local_rank if env.enabled else dist.get_rank()
        return _Ranks(dist.get_rank(), dist.get_world_size(), local_rank, joined=True, group=group)
    if not env.enabled:
        return _Ranks(0, 1, 0)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=long_wait)
    return _Ranks(env.rank, env.world_size, env.local_rank, joined=True, owns_process_group=True)


# --------------------------------------------------------------------------- records

def _atomic_write_png(image: Image.Image, path: Path, record: dict, tmp_tag: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_RECORD_KEY, json.dumps(record, ensure_ascii=False))
    tmp = path.with_name(f".{path.stem}.{tmp_tag}.tmp.png")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, the last bytes PIL writes


def _is_complete_png(path: Path) -> bool:
    """Whether ``path`` starts with the PNG signature and ends with the IEND chunk. A file cut
    short (the machine went down before the data reached the disk, an interrupted copy) fails;
    two small reads, no decode, so checking every image of a large corpus on resume is cheap."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
            if f.seek(0, os.SEEK_END) < len(_PNG_SIGNATURE) + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return head == _PNG_SIGNATURE and f.read() == _PNG_END
    except OSError:
        return False


def read_png_record(path: str | os.PathLike) -> dict:
    """The record ``generate_images`` stored inside a PNG (reads the header only)."""
    with Image.open(path) as im:
        return json.loads(im.info[PNG_RECORD_KEY])


_IMAGE_NAME = re.compile(r"images/\d+/(\d+)_(\d+)\.png")


def _is_image_name(name: str) -> bool:
    """Whether ``name`` is one that :func:`image_name` gives."""
    match = _IMAGE_NAME.fullmatch(name)
    return match is not None and image_name(int(match[1]), int(match[2])) == name


def _read_metadata(out: Path) -> tuple[list[str], dict[str, dict]]:
    """The columns of ``out/metadata.csv`` and its rows by file name ([], {} without one). A
    metadata.csv that lists files ``generate_images`` does not write (a corpus of the user's
    own images) is a ValueError: rebuilding it from the PNGs would drop those rows."""
    meta = out / "metadata.csv"
    if not meta.is_file():
        return [], {}
    fields, rows = read_csv(meta)
    if "file_name" not in fields:
        raise ValueError(f"{meta} has no 'file_name' column: `l2p data generate` did not write it, and "
                         "would replace it; use another --out folder")
    known = {row["file_name"]: row for row in rows}
    foreign = [name for name in known if not _is_image_name(name or "")]
    if foreign:
        raise ValueError(f"{meta} lists {len(foreign)} files that `l2p data generate` did not write (e.g. "
                         f"{foreign[0]!r}); it would rewrite metadata.csv without them. Use another --out "
                         "folder")
    return fields, known


def rebuild_metadata(out: str | os.PathLike) -> int:
    """Write ``out/metadata.csv`` from the PNGs under ``out/images`` (sorted by name) and
    return the row count. Rows of the existing metadata.csv are reused when their file still
    exists, with any columns added to it (a second caption, a score); only PNGs without a row
    are opened. Safe to run at any time; refuses a metadata.csv that lists other files than
    generated images (see :func:`_read_metadata`)."""
    out = Path(out)
    meta = out / "metadata.csv"
    fields, known = _read_metadata(out)
    columns = [*METADATA_COLUMNS, *(c for c in fields if c not in METADATA_COLUMNS)]
    rows = []
    for png in sorted((out / "images").glob("*/*.png")):
        if png.name.startswith("."):
            continue  # an unfinished temporary file
        name = png.relative_to(out).as_posix()
        if not _is_complete_png(png):
            logger.warning("%s is cut short; left out of metadata.csv (`l2p data generate` renders it again)",
                           name)
            continue
        row = known.get(name)
        if row is None:
            try:
                row = {"file_name": name, **read_png_record(png)}
            except (OSError, KeyError, ValueError) as exc:
                logger.warning("%s has no readable l2p record (%s); left out of metadata.csv", name, exc)
                continue
        rows.append({k: row.get(k, "") for k in columns})
    with atomic_path(meta) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


# Settings that decide the pixels but not the prompts: how to ask for the original ones.
_SETTING_FLAGS = {"dtype": "--dtype", "device_type": "--device"}


def _has_images(out: Path) -> bool:
    return any(not png.name.startswith(".") for png in (out / "images").glob("*/*.png"))


def _check_manifest(out: Path, manifest: dict) -> None:
    """Refuse to continue a folder that was rendered with other prompts or settings: its images
    would not match the ones this run would make.

    The source is compared by ``source_digest`` (its content); manifests written before the
    digest was recorded fall back to the path. Manifests written before dtype and device
    type were recorded cannot say which were used; they are assumed to match this run (the
    images cannot tell), with a warning, and the manifest written next records them. A
    manifest with no image beside it (every image of that run failed, e.g. an invalid size)
    is simply replaced: nothing rendered under it could be mixed; images without a manifest
    are refused (their settings are unknown)."""
    path = out / MANIFEST
    if not _has_images(out):
        return
    if not path.is_file():
        # generate_images writes the manifest before its first image, so it was removed (or the
        # images came from elsewhere): nothing tells what they were rendered with.
        raise ValueError(f"{out} holds images under images/ but no {MANIFEST}, so the prompts and settings they "
                         f"were rendered with are unknown and this run could mix two corpora; put its {MANIFEST} "
                         "back, or use another --out folder")
    try:
        old = json.loads(path.read_text("utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); put the original back, or use another "
                         "--out folder") from None
    changed = []
    for key, value in manifest.items():
        if key in ("images_per_prompt", "source"):
            continue  # more or fewer tries per prompt is fine; the path is only for people
        if key == "source_digest":
            # Old manifests have no digest: compare the path they have instead.
            same = old[key] == value if key in old else old.get("source") == manifest["source"]
            if not same:
                changed.append("source")
        elif key in _SETTING_FLAGS and key not in old:
            logger.warning("%s predates the recording of %s; assuming its images were rendered with "
                           "%s=%s like this run", path, key, key, value)
        elif old.get(key) != value:
            changed.append(key)
    if changed:
        def describe(key: str) -> str:
            if key != "source":
                return f"{key} (recorded: {old.get(key)!r}, this run: {manifest[key]!r})"
            if "source_digest" not in old:
                return (f"source (recorded: {old.get('source')!r}, this run: {manifest['source']!r}; the "
                        "manifest predates content digests, so the path decides)")
            if old.get("source") == manifest["source"]:
                return f"source (the model in {manifest['source']!r} has changed since: its content differs)"
            return f"source (recorded: {old.get('source')!r}, whose content differs from {manifest['source']!r})"

        described = [describe(k) for k in changed]
        original = " ".join(f"{_SETTING_FLAGS[k]} {old[k]}" for k in changed if k in _SETTING_FLAGS)
        raise ValueError(f"{out} was rendered with a different {'; '.join(described)}; mixing them would "
                         "make a corpus of two settings. Use a new --out folder, or rerun with the original "
                         f"settings{' (' + original + ')' if original else ''}")


def _check_size(pipe, height: int, width: int) -> None:
    """Refuse a size the pipeline cannot render before any image is tried (else every image
    fails alike): the pipeline's own ``check_inputs`` (called with just a prompt and the size;
    it may demand more than the grid, PixArt wants multiples of 8), then the latent grid
    (vae_scale_factor x patch size), which a check_inputs may not test."""
    problem = None
    check = getattr(pipe, "check_inputs", None)
    if check is not None:
        kwargs = {}
        for name, param in inspect.signature(check).parameters.items():
            if name in ("height", "width"):
                kwargs[name] = height if name == "height" else width
            elif name == "prompt":
                kwargs[name] = "a size check"
            elif name == "callback_steps":
                kwargs[name] = 1
            elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL,
                                                                                 param.VAR_KEYWORD):
                kwargs[name] = None
        try:
            check(**kwargs)
        except ValueError as exc:
            if "height" in str(exc) or "width" in str(exc):
                problem = str(exc).splitlines()[0].rstrip(".")
        except Exception:  # noqa: BLE001 - a check_inputs that needs more than a prompt: grid check only
            pass
    factor = getattr(pipe, "vae_scale_factor", None)
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    multiple = factor * patch if isinstance(factor, int) and isinstance(patch, int) else None
    what = f"{multiple} (vae scale factor {factor} x patch size {patch})"
    if _renders_pixels(pipe):  # no VAE: the pixel patch
        multiple, what = patch, f"the pixel patch size {patch}"
    if problem is None and multiple and (height % multiple or width % multiple):
        problem = f"height and width must be multiples of {what}"
    if problem:
        raise ValueError(f"--height {height} --width {width} do not suit this {type(pipe).__name__}: "
                         f"{problem}; pick a size it accepts")


def _renders_pixels(pipe) -> bool:
    from l2p.sample.pipeline import L2PPipeline

    return isinstance(pipe, L2PPipeline)


def _count_beyond(out: Path, images_per_prompt: int) -> int:
    """PNGs whose image index is >= images_per_prompt (left by an earlier run with more)."""
    count = 0
    for png in (out / "images").glob("*/*_*.png"):
        index = png.stem.rpartition("_")[2]
        if not png.name.startswith(".") and index.isdigit() and int(index) >= images_per_prompt:
            count += 1
    return count


# --------------------------------------------------------------------------- rendering

def _call_kwargs(pipe, config: GenerationConfig) -> tuple[dict, dict]:
    """Arguments for ``pipe(...)`` that this pipeline accepts (the rest keep its defaults),
    and the steps and guidance that will really be used, for the records."""
    params = inspect.signature(pipe.__call__).parameters
    wanted = {"height": config.height, "width": config.width, "num_inference_steps": config.steps,
              "guidance_scale": config.guidance, "num_images_per_prompt": 1,
              # Floats, checked before _render makes 8-bit images of them: the conversion turns
              # NaN (a half-precision overflow) into black, which would pass for an image.
              "output_type": "np",
              # Binning renders at the nearest trained size and then resizes to the requested
              # one; resampled images would teach the pixel model interpolation artefacts.
              "use_resolution_binning": False,
              # PixArt's caption cleaning runs only where bs4 and ftfy happen to be installed;
              # the trainer and the sampler encode the caption as written, so the corpus must too.
              "clean_caption": False}
    kwargs = {k: v for k, v in wanted.items() if v is not None and k in params}
    effective = {}
    for name, key in (("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
        default = params[key].default if key in params else ""
        if default is None and _renders_pixels(pipe):  # it samples at its source pipeline's default
            default = pipe.source_default(key, "")
        effective[name] = kwargs.get(key, "" if default is inspect.Parameter.empty else default)
    return kwargs, effective


def _render(pipe, texts: list[str], seeds: list[int], kwargs: dict, device: str) -> list[Image.Image]:
    from diffusers.utils.pil_utils import numpy_to_pil

    gen_device = device if device.startswith("cuda") else "cpu"
    generators = [torch.Generator(gen_device).manual_seed(s) for s in seeds]
    images = pipe(prompt=texts, generator=generators, **kwargs).images
    if len(images) != len(texts):
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(texts)} prompts")
    if isinstance(images, Image.Image) or isinstance(images[0], Image.Image):
        return list(images)  # a pipeline without output_type
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    broken = int((~np.isfinite(pixels).reshape(len(texts), -1).all(axis=1)).sum())
    if broken:
        raise FloatingPointError(f"the pipeline gave non-finite pixels (NaN or inf) for {broken} of {len(texts)} "
                                 "images, which would be saved as black; render in float32 (--dtype float32)")
    return numpy_to_pil(pixels)


def _batches(jobs: list, size: int) -> Iterator[list]:
    for start in range(0, len(jobs), size):
        yield jobs[start:start + size]


def generate_images(config: GenerationConfig, *, pipe=None, rank: int | None = None,
                    world_size: int | None = None, prompt_indices=None,
                    progress: bool = True) -> GenerationSummary:
    """Render ``images_per_prompt`` images for every prompt into ``config.out``.

    ``prompt_indices`` limits this call to those prompts (by index in the prompt file); the
    images of the others are neither rendered nor removed, so a caller can add tries for
    some prompts only (raise ``images_per_prompt`` and name them).

    Continues where a previous run stopped; a failing image is logged and counted, and the
    next run retries it. ``pipe`` may be passed to reuse a loaded pipeline; ``rank`` and
    ``world_size`` override what torch.distributed / torchrun say (then no barrier is held
    and the caller runs :func:`rebuild_metadata` once all ranks are done).
    """
    from tqdm.auto import tqdm

    if config.images_per_prompt < 1 or config.batch_size < 1:
        raise ValueError("--images-per-prompt and --batch-size must be at least 1")
    if config.height <= 0 or config.width <= 0:
        raise ValueError("--height and --width must be positive")
    if config.steps is not None and config.steps < 1:
        # Zero steps is no denoising at all: the pipeline decodes its starting noise, every
        # image "renders" and the corpus is noise.
        raise ValueError(f"--steps must be at least 1 (got {config.steps}); leave it out for the pipeline's default")
    if config.guidance is not None and not math.isfinite(config.guidance):
        # NaN compares false with the pipelines' "guidance > 1": they would render without
        # guidance while every record says nan.
        raise ValueError(f"--guidance must be a finite number (got {config.guidance})")
    start_time = time.perf_counter()
    source = str(resolve_source(config.source).resolve())
    digest = source_digest(source)
    prompts = read_prompts(config.prompts)
    if not prompts:
        raise ValueError(f"{config.prompts} holds no prompts")
    ranks = _join_ranks() if rank is None else _Ranks(rank, world_size or 1, rank)
    repeated = [text for text, count in Counter(prompts).items() if count > 1]
    if repeated and ranks.rank == 0:
        # Every copy is a prompt of its own (its own images and seeds): the prompt weighs double.
        logger.warning("%d prompts appear more than once in %s (e.g. %r); each copy gets its own %d images. "
                       "Remove the copies to give every prompt the same weight", len(repeated), config.prompts,
                       repeated[0][:80], config.images_per_prompt)
    try:
        out = Path(config.out)
        # Resolved before anything is compared: "auto" means another dtype on another device,
        # and the device type also decides the noise generator (CUDA or CPU).
        if config.device:
            device = config.device
        elif pipe is not None:
            device = str(pipe.device)
        else:
            device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"
        if pipe is not None:
            dtype = pipe.dtype  # what a given pipeline renders with, whatever config.dtype says
        else:
            dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) \
                if config.dtype == "auto" else getattr(torch, config.dtype)
        settings = {"dtype": str(dtype).removeprefix("torch."), "device_type": torch.device(device).type}
        manifest = {
            "source": source, "source_digest": digest,
            "prompts_sha256": prompts_digest(prompts),
            "num_prompts": len(prompts), "images_per_prompt": config.images_per_prompt,
            "height": config.height, "width": config.width, "steps": config.steps,
            "guidance": config.guidance, "seed": config.seed, **settings,
        }
        _check_manifest(out, manifest)
        _read_metadata(out)  # refused now, not after rendering, if the end would drop rows

        chosen = range(len(prompts)) if prompt_indices is None else sorted(set(prompt_indices))
        if chosen and not 0 <= chosen[0] <= chosen[-1] < len(prompts):
            raise ValueError(f"prompt_indices must lie in [0, {len(prompts)}), the prompt file's range")
        jobs = [(p, i) for p in chosen for i in range(config.images_per_prompt)]
        mine = jobs[ranks.rank::ranks.world_size]
        todo = [(p, i) for p, i in mine if not _is_complete_png(out / image_name(p, i))]
        cut_short = sum(1 for p, i in todo if (out / image_name(p, i)).exists())
        if cut_short:
            logger.warning("%d images in %s are cut short (not complete PNGs); rendering them again",
                           cut_short, out)
        summary = GenerationSummary(ranks.rank, ranks.world_size, planned=len(mine),
                                    existing=len(mine) - len(todo), images_per_prompt=config.images_per_prompt)
        if todo:
            if pipe is None:
                pipe = load_pipeline(config.source, device=device, dtype=dtype)
            _check_size(pipe, config.height, config.width)
        # Written only once the size is known to work, so a refused run leaves no manifest
        # that would then refuse the corrected one.
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        tmp_tag = f"rank{ranks.rank}"
        for stale in (out / "images").glob(f"*/.*.{tmp_tag}.tmp.png"):
            stale.unlink()  # left by a run of this rank that was killed mid-write

        if todo:
            kwargs, effective = _call_kwargs(pipe, config)
            common = {"height": config.height, "width": config.width, "source": source,
                      "source_digest": digest, **effective, **settings}
            bar = tqdm(total=len(mine), initial=summary.existing, unit="img",
                       desc=f"rank {ranks.rank}" if ranks.world_size > 1 else "generate",
                       disable=not progress or ranks.rank != 0)
            for batch in _batches(todo, config.batch_size):
                for (p, i), image in _render_batch(pipe, prompts, batch, config, kwargs, device, summary):
                    path = out / image_name(p, i)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    record = {"text": prompts[p], "seed": derive_seed(config.seed, p, i), **common,
                              "prompt_index": p, "image_index": i}
                    _atomic_write_png(image, path, record, tmp_tag)
                    summary.rendered += 1
                bar.update(len(batch))
            bar.close()
        # The end is collective: every rank reports its failures (which waits for all to
        # finish rendering), rank 0 writes metadata.csv, and no rank returns before it is
        # written. Ranks then agree on the status, so none exits early with an error and
        # makes torchrun stop rank 0 mid-write.
        if ranks.joined:
            outcomes = dict(enumerate(ranks.all_gather((len(summary.failed), summary.rendered))))
            summary.failed_all_ranks = sum(failed for failed, _ in outcomes.values())
        else:
            outcomes = {ranks.rank: (len(summary.failed), summary.rendered)}
        summary.broken_ranks = [r for r, (failed, rendered) in outcomes.items() if failed and not rendered]
        if ranks.rank == 0 and (ranks.joined or ranks.world_size == 1):
            summary.metadata_rows = rebuild_metadata(out)
            summary.beyond = _count_beyond(out, config.images_per_prompt)
        ranks.barrier()
        summary.seconds = time.perf_counter() - start_time
        return summary
    finally:
        ranks.close()


def _render_batch(pipe, prompts: list[str], batch: list[tuple[int, int]], config: GenerationConfig,
                  kwargs: dict, device: str, summary: GenerationSummary):
    """Yield ((p, i), image) for the batch; if the batch fails, retry image by image so one
    bad prompt costs one image, and log and count the images that still fail."""
    def render(jobs):
        return _render(pipe, [prompts[p] for p, _ in jobs],
                       [derive_seed(config.seed, p, i) for p, i in jobs], kwargs, device)

    try:
        yield from zip(batch, render(batch))
        return
    except Exception as exc:  # noqa: BLE001 - any pipeline error is per-image, never fatal
        if len(batch) == 1:
            _log_failure(batch[0], exc, summary)
            return
        logger.warning("batch of %d failed (%s); retrying image by image", len(batch), exc)
    for job in batch:
        try:
            yield job, render([job])[0]
        except Exception as exc:  # noqa: BLE001
            _log_failure(job, exc, summary)


def _log_failure(job: tuple[int, int], exc: Exception, summary: GenerationSummary) -> None:
    name = image_name(*job)
    logger.error("failed to render %s: %s: %s", name, type(exc).__name__, exc)
    summary.failed.append(name)


