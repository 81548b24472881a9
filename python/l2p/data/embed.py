"""A cache of the source pipeline's prompt conditioning, so training can run without loading
the text encoders (low-memory mode).

``build_embedding_cache`` loads only the pipeline's tokenizers and text encoders and runs the
source family's conditioning (its adapter's ``encode_prompts``, l2p/adapters/: the pipeline's
own ``encode_prompt`` called as the pipeline calls it, e.g. Sana with its complex human
instruction, Qwen-Image's rows without the batch's padding) on every distinct caption of a
dataset, plus "" (caption dropout, encoded as the pipeline encodes its negative prompt). It
stores, per caption, every tensor of that conditioning under the name the trainer reads, so a
run from the cache sees exactly the tensors a run with the text encoders computes. Layout::

    index.json               {"captions": {caption: [shard, row]}, "names": [...], ...}
    shard-00000.safetensors  keys "<row>/<name>", one tensor per caption and name

Per-caption keys keep variable-length conditioning (Z-Image and Qwen-Image keep one unpadded
tensor per caption) exact. Re-running adds only captions that are not cached yet; the index
is rewritten atomically after each shard, so an interrupted run keeps what it finished. A
shard that went missing or was cut short afterwards (an interrupted copy of the folder) is
refused when the cache is opened, not when training first needs it, and re-running encodes
its captions again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from l2p.atomic import atomic_path, write_json
from l2p.data.dataset import list_captioned_files
from l2p.data.generate import load_pipeline, resolve_source, source_digest

logger = logging.getLogger(__name__)
INDEX = "index.json"
# 2: the family's conditioning (adapter.encode_prompts); 1 stored encode_prompt's raw outputs.
CACHE_FORMAT = 2


def source_transformer_class(source: Path) -> str:
    """The diffusers transformer class of a source folder (for a converted L2P folder, the
    class it was converted from)."""
    entry = json.loads((source / "model_index.json").read_text("utf-8")).get("transformer") or [None, None]
    if entry[0] == "l2p":
        return json.loads((source / "transformer" / "config.json").read_text("utf-8"))["source_class"]
    if entry[1] is None:
        raise ValueError(f"{source} has no transformer entry in model_index.json; pass a DiT-family "
                         "pipeline folder")
    return entry[1]


def encode_captions(pipe, source_class: str, captions: list[str], device: str,
                    ) -> tuple[list[dict[str, torch.Tensor]], set[str]]:
    """The family's conditioning of ``captions``, split per caption. Returns (one dict per
    caption, the names whose conditioning is a list of per-caption tensors)."""
    from l2p.train import conditioning

    with torch.no_grad():
        cond = conditioning.encode_captions(conditioning.family_for(source_class), pipe, captions, device)
    rows: list[dict[str, torch.Tensor]] = [{} for _ in captions]
    list_names: set[str] = set()
    for name, value in cond.items():
        if isinstance(value, (list, tuple)) and len(value) == len(captions):
            list_names.add(name)
        elif not (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == len(captions)):
            raise TypeError(f"{source_class} conditioning {name!r} is neither a batch-first tensor nor a "
                            f"list with one tensor per caption; the embedding cache cannot split it")
        for row, tensor in zip(rows, value):
            row[name] = tensor.detach().cpu().clone().contiguous()
    return rows, list_names


def _text_only_components(source: Path) -> dict[str, None]:
    """Pipeline components to skip: every weighted component that is not a text encoder."""
    index = json.loads((source / "model_index.json").read_text("utf-8"))
    skip = {}
    for name, spec in index.items():
        if name.startswith("_") or name.startswith("text_encoder") or not isinstance(spec, list):
            continue
        folder = source / name
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            skip[name] = None
    return skip


def _read_index(folder: Path) -> dict:
    index = json.loads((folder / INDEX).read_text("utf-8"))
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{folder} is an embedding cache of format {index.get('format')!r}; this l2p "
                         f"reads format {CACHE_FORMAT}: delete the folder and run `l2p data embed` again")
    return index


def _damaged_shards(folder: Path, index: dict) -> dict[int, str]:
    """The shards that the index's captions point to and that cannot serve them, with what is
    wrong: missing, unreadable (cut short: safetensors checks that the file covers its
    header), or without the rows the index places in them. Reads the headers only."""
    rows_by_shard: dict[int, set[int]] = {}
    for shard, row in index["captions"].values():
        rows_by_shard.setdefault(shard, set()).add(row)
    damaged = {}
    for shard, rows in sorted(rows_by_shard.items()):
        path = folder / index["shards"][shard]
        if not path.is_file():
            damaged[shard] = "missing"
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = {int(key.partition("/")[0]) for key in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            damaged[shard] = f"unreadable ({exc})"
            continue
        if not rows <= stored:
            damaged[shard] = f"without {len(rows - stored)} of its rows"
    return damaged


def _check_index(out: Path, index: dict, wanted: dict) -> None:
    """Refuse to add to a cache made from another source or with another dtype or device type:
    the cache would hold embeddings of two settings. The source is compared by its content
    digest; indexes from before the digest fall back to its path. Indexes from before dtype
    and device type were recorded: the dtype is checked against the cached tensors once the
    first new batch is encoded (:func:`_check_legacy_dtypes`); the device type cannot be
    known and is assumed to match, with a warning."""
    if "source_digest" in index:
        if index["source_digest"] != wanted["source_digest"]:
            where = ("the model there has changed since" if index.get("source") == wanted["source"]
                     else f"the content of {wanted['source']!r} differs")
            raise ValueError(f"{out} caches embeddings of another model (recorded source "
                             f"{index.get('source')!r}; {where}); use another --out folder or delete it")
    elif index.get("source") != wanted["source"]:
        raise ValueError(f"{out} caches embeddings of {index.get('source')!r}, not {wanted['source']!r}; "
                         "use another --out folder or delete it")
    for key, flag in (("dtype", "--dtype"), ("device_type", "--device")):
        if key not in index:
            if key == "device_type" and index["captions"]:
                logger.warning("%s predates the recording of the device type; assuming its embeddings "
                               "were encoded on %s like this run", out / INDEX, wanted[key])
        elif index[key] != wanted[key]:
            raise ValueError(f"{out} caches embeddings encoded with {key} {index[key]}, not {wanted[key]}; "
                             "mixing them would train on two settings. Use another --out folder, or rerun "
                             f"with {flag} {index[key]}")


def _stored_dtypes(out: Path, index: dict) -> dict[str, torch.dtype]:
    """The dtype of each conditioning name in the cache's first shard."""
    if not index["shards"]:
        return {}
    with safe_open(str(out / index["shards"][0]), framework="pt") as f:
        return {key.partition("/")[2]: f.get_tensor(key).dtype for key in f.keys()}


def _check_legacy_dtypes(out: Path, stored: dict[str, torch.dtype], row: dict[str, torch.Tensor]) -> None:
    for name, tensor in row.items():
        if name in stored and stored[name] != tensor.dtype:
            raise ValueError(f"{out} caches {name!r} as {stored[name]}, this run encodes it as {tensor.dtype}; "
                             "mixing them would train on two settings (nothing was written). Use another "
                             f"--out folder, or rerun with the dtype of the cache (--dtype "
                             f"{str(stored[name]).removeprefix('torch.')})")


def build_embedding_cache(source: str | os.PathLike, data: str | os.PathLike, *,
                          out: str | os.PathLike | None = None, batch_size: int = 16,
                          shard_size: int = 1024, caption_column: str | None = None,
                          device: str | None = None, dtype: str = "auto", progress: bool = True,
                          extra_captions: Sequence[str] = ()) -> dict:
    """Cache the prompt embeddings of every caption of the dataset folder ``data`` (and "",
    and ``extra_captions``: prompts used beside the data, such as the trainer's sample
    prompts) into ``out`` (default ``data/embeddings``). Returns a summary dict."""
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError("--batch-size and --shard-size must be at least 1")
    source_path = resolve_source(source)
    source_class = source_transformer_class(source_path)
    out = Path(out) if out is not None else Path(data) / "embeddings"
    captions = list(dict.fromkeys(["", *(f.caption for f in list_captioned_files(data, caption_column)),
                                   *extra_captions]))
    # Resolved before the cache is compared: "auto" means bfloat16 on CUDA, float32 on CPU.
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) \
        if dtype == "auto" else getattr(torch, dtype)
    # "source" stays for people; "source_digest" is what is compared.
    wanted = {"source": str(source_path.resolve()), "source_digest": source_digest(source_path),
              "dtype": str(torch_dtype).removeprefix("torch."), "device_type": torch.device(device).type}
    index = {"format": CACHE_FORMAT, **wanted, "source_class": source_class,
             "pipeline": None, "names": [], "list_names": [], "shards": [], "captions": {}}
    legacy_dtypes: dict[str, torch.dtype] = {}
    if (out / INDEX).is_file():
        index = _read_index(out)
        _check_index(out, index, wanted)
        if "dtype" not in index:
            legacy_dtypes = _stored_dtypes(out, index)
        index.update(wanted)  # from now on recorded (an old index gains them on its next write)
        damaged = _damaged_shards(out, index)
        if damaged:
            # Their captions are encoded again into new shards; the index stops pointing at them.
            for shard, problem in damaged.items():
                logger.warning("%s is %s; encoding its captions again", out / index["shards"][shard], problem)
            index["captions"] = {c: at for c, at in index["captions"].items() if at[0] not in damaged}
    todo = [c for c in captions if c not in index["captions"]]
    summary = {"captions": len(captions), "cached_before": len(captions) - len(todo), "encoded": 0,
               "out": str(out)}
    if not todo:
        return summary

    pipe = load_pipeline(source_path, device=device, dtype=torch_dtype, **_text_only_components(source_path))
    index["pipeline"] = type(pipe).__name__
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="caption", desc="embed", disable=not progress)
    for shard_start in range(0, len(todo), shard_size):
        shard_captions = todo[shard_start:shard_start + shard_size]
        tensors: dict[str, torch.Tensor] = {}
        for start in range(0, len(shard_captions), batch_size):
            batch = shard_captions[start:start + batch_size]
            rows, list_names = encode_captions(pipe, source_class, batch, device)
            if legacy_dtypes:
                _check_legacy_dtypes(out, legacy_dtypes, rows[0])
                legacy_dtypes = {}
            for offset, row in enumerate(rows):
                for name, tensor in row.items():
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        # A cache of NaN would make every training step non-finite, far from here.
                        raise ValueError(
                            f"the text encoders gave non-finite {name!r} for caption "
                            f"{batch[offset]!r} on {device} in {torch_dtype}; nothing of this shard "
                            "was written. Encode in float32 (`l2p data embed --dtype float32`)")
                    tensors[f"{start + offset}/{name}"] = tensor
            index["names"] = sorted(set(index["names"]) | {n for r in rows for n in r})
            index["list_names"] = sorted(set(index["list_names"]) | list_names)
            bar.update(len(batch))
        shard_name = f"shard-{len(index['shards']):05d}.safetensors"
        with atomic_path(out / shard_name) as tmp:
            save_file(tensors, str(tmp))
        shard_id = len(index["shards"])
        index["shards"].append(shard_name)
        index["captions"].update({c: [shard_id, row] for row, c in enumerate(shard_captions)})
        write_json(out / INDEX, index, ensure_ascii=False)
        summary["encoded"] += len(shard_captions)
    bar.close()
    return summary


class EmbeddingCache:
    """Read access to a cache written by :func:`build_embedding_cache`.

    ``cache[caption]`` is a dict name -> tensor: that caption's row of the family's
    conditioning. ``cache(captions)`` is the trainer's view: the per-caption tensors of a
    batch, stacked on a new first dimension, or kept as a list where the family keeps one
    tensor per caption (Z-Image, Qwen-Image).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise FileNotFoundError(f"{str(self.path)!r} holds no embedding cache ({INDEX} missing); "
                                    "create it with `l2p data embed`")
        self.index = _read_index(self.path)
        # Checked now, not when a batch first needs the shard: that could be hours into training.
        damaged = _damaged_shards(self.path, self.index)
        if damaged:
            shard, problem = next(iter(damaged.items()))
            raise ValueError(f"{self.path / self.index['shards'][shard]} is {problem} ({len(damaged)} damaged "
                             "shards in all); run `l2p data embed` again, which encodes their captions anew")
        self._handles: dict[int, tuple] = {}  # shard -> (open file, its keys)

    @property
    def names(self) -> list[str]:
        return list(self.index["names"])

    @property
    def captions(self) -> list[str]:
        return list(self.index["captions"])

    @property
    def source(self) -> str:
        return self.index["source"]

    def __len__(self) -> int:
        return len(self.index["captions"])

    def __contains__(self, caption: str) -> bool:
        return caption in self.index["captions"]

    def __getitem__(self, caption: str) -> dict[str, torch.Tensor]:
        try:
            shard, row = self.index["captions"][caption]
        except KeyError:
            raise KeyError(f"caption {caption[:60]!r} is not in the embedding cache {self.path}; "
                           "re-run `l2p data embed` after changing the dataset, with --prompt TEXT "
                           "for prompts that are not among its captions (the sample prompts)") from None
        if shard not in self._handles:
            handle = safe_open(str(self.path / self.index["shards"][shard]), framework="pt")
            self._handles[shard] = (handle, set(handle.keys()))
        handle, keys = self._handles[shard]
        return {name: handle.get_tensor(f"{row}/{name}") for name in self.index["names"]
                if f"{row}/{name}" in keys}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        rows = [self[c] for c in captions]
        return {name: [r[name] for r in rows] if name in self.index["list_names"]
                else torch.stack([r[name] for r in rows])
                for name in self.index["names"]}

    def __getstate__(self):  # safe_open handles do not pickle; DataLoader workers reopen them
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
