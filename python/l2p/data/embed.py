"""A cache of the source pipeline's prompt embeddings, so training can run without loading
the text encoders (low-memory mode).

``build_embedding_cache`` loads only the pipeline's tokenizers and text encoders, runs its own
``encode_prompt`` on every distinct caption of a dataset (plus "", used by caption dropout and
as the negative prompt of classifier-free guidance) and stores, per caption, every tensor that
``encode_prompt`` returns: the sequence embeddings and whatever the family adds (attention
masks for PixArt/Sana/Lumina2, pooled embeddings for SD3/SDXL/FLUX, ``text_ids`` for FLUX).
The names are read from ``encode_prompt``'s own ``return`` statement, so they are the keyword
names the pipeline and its transformer use. Layout of the cache folder::

    index.json               {"captions": {caption: [shard, row]}, "names": [...], ...}
    shard-00000.safetensors  keys "<row>/<name>", one tensor per caption and name
    shared.safetensors       tensors that do not depend on the caption (e.g. FLUX text_ids)

Per-caption keys keep variable-length outputs (Z-Image returns a list of unpadded tensors)
exact. Re-running adds only captions that are not cached yet; the index is rewritten
atomically after each shard, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import textwrap
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from l2p.data.dataset import list_captioned_files
from l2p.data.generate import load_pipeline, resolve_source

INDEX = "index.json"
SHARED = "shared.safetensors"
CACHE_FORMAT = 1


def encode_prompt_output_names(pipe) -> list[str] | None:
    """The names in ``return a, b, c`` of the pipeline's (or pipeline class's) ``encode_prompt``,
    or None when the return statement is not a tuple of plain names."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.encode_prompt)))
    except (OSError, TypeError, SyntaxError):
        return None
    returns = [n.value for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    if not returns:
        return None
    value = returns[-1]
    elements = value.elts if isinstance(value, ast.Tuple) else [value]
    if not all(isinstance(e, ast.Name) for e in elements):
        return None
    return [e.id for e in elements]


def encode_captions(pipe, captions: list[str], device: str,
                    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor], set[str]]:
    """Run ``pipe.encode_prompt`` on ``captions`` (no classifier-free guidance: the negative is
    the cached "") and split the outputs per caption. Returns (one dict per caption, tensors
    shared by all captions, names that ``encode_prompt`` returns as lists of unpadded tensors)."""
    params = inspect.signature(pipe.encode_prompt).parameters
    if "prompt" not in params:
        raise TypeError(f"{type(pipe).__name__}.encode_prompt takes no 'prompt'; this pipeline "
                        "family is not supported by the embedding cache")
    kwargs = {"prompt": captions}
    # SD3 and FLUX take one prompt per text encoder; None means "the same as prompt".
    for name, value in (("device", device), ("num_images_per_prompt", 1),
                        ("do_classifier_free_guidance", False), ("prompt_2", None),
                        ("prompt_3", None)):
        if name in params:
            kwargs[name] = value
    with torch.no_grad():
        outputs = pipe.encode_prompt(**kwargs)
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    names = encode_prompt_output_names(pipe)
    if names is None or len(names) != len(outputs):
        names = [f"output_{i}" for i in range(len(outputs))]
    rows: list[dict[str, torch.Tensor]] = [{} for _ in captions]
    shared: dict[str, torch.Tensor] = {}
    list_names: set[str] = set()
    for name, value in zip(names, outputs):
        if value is None:
            continue  # the negative branch, which CFG-off leaves empty
        if isinstance(value, (list, tuple)) and len(value) == len(captions):
            list_names.add(name)
            for row, tensor in zip(rows, value):
                row[name] = tensor.detach().cpu().clone().contiguous()
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == len(captions) \
                and not name.endswith("_ids"):
            for i, row in enumerate(rows):
                row[name] = value[i].detach().cpu().clone().contiguous()
        elif isinstance(value, torch.Tensor):
            shared[name] = value.detach().cpu().contiguous()  # position ids and the like
        else:
            raise TypeError(f"encode_prompt returned {name} of type {type(value).__name__}; "
                            "the embedding cache stores tensors only")
    return rows, shared, list_names


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


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _check_cacheable(source: Path) -> None:
    from l2p.adapters import ADAPTERS

    entry = json.loads((source / "model_index.json").read_text("utf-8")).get("transformer") or [None, None]
    adapter = ADAPTERS.get(entry[1])
    if adapter is not None and adapter.no_embedding_cache:
        raise ValueError(f"{entry[1]} sources have no text-embedding cache ({adapter.no_embedding_cache}); "
                         "train them with data.embeddings=null")


def build_embedding_cache(source: str | os.PathLike, data: str | os.PathLike, *,
                          out: str | os.PathLike | None = None, batch_size: int = 16,
                          shard_size: int = 1024, caption_column: str | None = None,
                          device: str | None = None, dtype: str = "auto", progress: bool = True) -> dict:
    """Cache the prompt embeddings of every caption of the dataset folder ``data`` (and "")
    into ``out`` (default ``data/embeddings``). Returns a summary dict."""
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError("--batch-size and --shard-size must be at least 1")
    source_path = resolve_source(source)
    _check_cacheable(source_path)
    out = Path(out) if out is not None else Path(data) / "embeddings"
    captions = list(dict.fromkeys(["", *(f.caption for f in list_captioned_files(data, caption_column))]))
    index = {"format": CACHE_FORMAT, "source": str(source_path.resolve()), "pipeline": None,
             "names": [], "list_names": [], "shared": [], "shards": [], "captions": {}}
    if (out / INDEX).is_file():
        index = json.loads((out / INDEX).read_text("utf-8"))
        if index.get("source") != str(source_path.resolve()):
            raise ValueError(f"{out} caches embeddings of {index.get('source')!r}, not {str(source_path)!r}; "
                             "use another --out folder or delete it")
    todo = [c for c in captions if c not in index["captions"]]
    summary = {"captions": len(captions), "cached_before": len(captions) - len(todo), "encoded": 0,
               "out": str(out)}
    if not todo:
        return summary

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) \
        if dtype == "auto" else getattr(torch, dtype)
    pipe = load_pipeline(source_path, device=device, dtype=torch_dtype, **_text_only_components(source_path))
    index["pipeline"] = type(pipe).__name__
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="caption", desc="embed", disable=not progress)
    for shard_start in range(0, len(todo), shard_size):
        shard_captions = todo[shard_start:shard_start + shard_size]
        tensors: dict[str, torch.Tensor] = {}
        for start in range(0, len(shard_captions), batch_size):
            batch = shard_captions[start:start + batch_size]
            rows, shared, list_names = encode_captions(pipe, batch, device)
            for offset, row in enumerate(rows):
                for name, tensor in row.items():
                    tensors[f"{start + offset}/{name}"] = tensor
            if shared and not index["shared"]:
                save_file(shared, str(out / SHARED))
                index["shared"] = sorted(shared)
            index["names"] = sorted(set(index["names"]) | {n for r in rows for n in r})
            index["list_names"] = sorted(set(index["list_names"]) | list_names)
            bar.update(len(batch))
        shard_name = f"shard-{len(index['shards']):05d}.safetensors"
        tmp = out / f".{shard_name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out / shard_name)
        shard_id = len(index["shards"])
        index["shards"].append(shard_name)
        index["captions"].update({c: [shard_id, row] for row, c in enumerate(shard_captions)})
        _write_json_atomic(out / INDEX, index)
        summary["encoded"] += len(shard_captions)
    bar.close()
    return summary


class EmbeddingCache:
    """Read access to a cache written by :func:`build_embedding_cache`.

    ``cache[caption]`` is a dict name -> tensor: that caption's row of every ``encode_prompt``
    output, plus the caption-independent tensors (``shared``). ``cache(captions)`` is the
    trainer's view: the per-caption tensors of a batch, stacked on a new first dimension, or
    kept as a list for outputs that ``encode_prompt`` itself returns as a list (Z-Image).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise FileNotFoundError(f"{str(self.path)!r} holds no embedding cache ({INDEX} missing); "
                                    "create it with `l2p data embed`")
        self.index = json.loads((self.path / INDEX).read_text("utf-8"))
        self._handles: dict[int, tuple] = {}  # shard -> (open file, its keys)
        self.shared: dict[str, torch.Tensor] = {}
        if self.index["shared"]:
            with safe_open(str(self.path / SHARED), framework="pt") as f:
                self.shared = {k: f.get_tensor(k) for k in f.keys()}

    @property
    def names(self) -> list[str]:
        return list(self.index["names"]) + list(self.index["shared"])

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
                           "re-run `l2p data embed` after changing the dataset") from None
        if shard not in self._handles:
            handle = safe_open(str(self.path / self.index["shards"][shard]), framework="pt")
            self._handles[shard] = (handle, set(handle.keys()))
        handle, keys = self._handles[shard]
        tensors = {name: handle.get_tensor(f"{row}/{name}") for name in self.index["names"]
                   if f"{row}/{name}" in keys}
        return {**tensors, **self.shared}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        rows = [self[c] for c in captions]
        return {name: [r[name] for r in rows] if name in self.index["list_names"]
                else torch.stack([r[name] for r in rows])
                for name in self.index["names"]}

    def __getstate__(self):  # safe_open handles do not pickle; DataLoader workers reopen them
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
