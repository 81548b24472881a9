"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step-00000100/``:

    trainable.safetensors     the trainable tensors (the delta), by parameter name
    ema.safetensors           EMA of the trainable tensors (fp32)
    optimizer.safetensors     every optimizer state tensor, as "<param name>/<key>"
    optimizer.json            the rest of the optimizer state dict (param groups, names)
    rng-rank<R>.safetensors   torch CPU and CUDA generator states of rank R (uint8)
    rng-rank<R>.json          python ``random`` and numpy states of rank R
    state.json                step, data position, counters, LR schedule, world size, dataset digest

Everything is written into a hidden temporary directory that is renamed into place only when
complete, so a run killed at any instant leaves either the old or the new checkpoint, never a
half-written one. Only tensors (safetensors) and JSON are written: nothing is pickled, and
loading never executes code. Under FSDP every rank stores its shards of the trainable, EMA and
optimizer tensors (``trainable-rank<R>.safetensors`` ...). Any checkpoint resumes on any number
of processes, with or without FSDP: an FSDP run of the world size that wrote the shards reads
its own; any other run (another world size, or DDP) joins them into whole tensors (FSDP2 cuts
dim 0 as ``torch.chunk`` does, so the pieces in rank order concatenate to the tensor), and an
FSDP run takes its part of whole tensors with ``distribute_tensor``. RNG states are restored
only at the same world size.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The step of checkpoint folder ``path`` (``step-00000100`` -> 100)."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint folder (step-NNNNNNNN)")
    return int(m.group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def recover_interrupted_save(run_dir: str | Path) -> None:
    """Re-saving a step moves the complete old copy to ``.old-step-N`` before the new one takes
    its name; a run killed between the two renames leaves only that copy: put it back. One
    process of a run calls this before any looks for the latest checkpoint."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if _STEP_DIR.match(final.name) and not final.exists():
            os.replace(old, final)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # FSDP2 DTensors are stored as this rank's shard.
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().contiguous().cpu()
            for k, v in tensors.items()}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)


def optimizer_to_flat(optimizer: torch.optim.Optimizer, param_names: list[str]) -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able remainder.
    ``param_names[i]`` names the optimizer's i-th parameter (its param_groups order)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        name = param_names[idx]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    meta = {"param_groups": sd["param_groups"], "param_names": param_names, "scalars": scalars,
            "has_state": [param_names[i] for i in sd["state"]]}
    return tensors, meta


def optimizer_from_flat(optimizer: torch.optim.Optimizer, param_names: list[str], tensors: dict, meta: dict) -> None:
    saved_groups = [len(g["params"]) for g in meta["param_groups"]]
    if meta["param_names"] != param_names or saved_groups != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("the checkpoint's optimizer was built over different parameters "
                         "(model.trainable or optim.new_layers_lr changed?); resume with the same config")
    index = {n: i for i, n in enumerate(param_names)}
    state: dict[int, dict] = {index[n]: dict(meta["scalars"].get(n, {})) for n in meta["has_state"]}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed torch's (CPU and CUDA), python's and numpy's global generators from (seed, step,
    rank): a resume on another number of processes, which has no saved states to restore."""
    a, b = np.random.SeedSequence([seed, step, rank, 0x52]).generate_state(2)
    torch.manual_seed(int(a) << 32 | int(b))
    random.seed(int(a) << 32 | int(b))
    np.random.seed(int(a))


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# save / load


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(run_dir: str | Path, step: int, *, rank: int, trainable: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer,
                    param_names: list[str], state: dict, keep_last: int, sharded: bool = False) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``. Every rank
    calls it; rank 0 owns the directory. With ``sharded`` every rank writes its own tensors."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    suffix = f"-rank{rank}" if sharded else ""
    if rank == 0 or sharded:
        save_file(_contiguous(trainable), str(tmp / f"trainable{suffix}.safetensors"))
        if ema is not None:
            save_file(_contiguous(ema), str(tmp / f"ema{suffix}.safetensors"))
        tensors, meta = optimizer_to_flat(optimizer, param_names)
        save_file(_contiguous(tensors), str(tmp / f"optimizer{suffix}.safetensors"))
        _write_json(tmp / f"optimizer{suffix}.json", meta)
    rng_tensors, rng_meta = rng_state()
    save_file(_contiguous(rng_tensors), str(tmp / f"rng-rank{rank}.safetensors"))
    _write_json(tmp / f"rng-rank{rank}.json", rng_meta)
    barrier()
    if rank == 0:
        _write_json(tmp / "state.json", dict(state, sharded=sharded))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        # A rerun past the same step replaces it. The old copy is deleted only once the new one
        # has its name, so a kill at any instant leaves one complete copy (see
        # recover_interrupted_save).
        trash = root / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, *, rank: int, world_size: int | None = None, fsdp: bool = False) -> dict:
    """The pieces of a checkpoint as tensors and JSON (see the module docstring), for process
    ``rank`` of ``world_size`` (None: the world size that wrote it) of a run that shards with
    FSDP2 (``fsdp``) or not. ``out["whole"]`` says whether the trainable, EMA and optimizer
    tensors are whole (False: this rank's FSDP shards, read where the checkpoint is sharded, the
    world size is the same and this run shards too). ``out["rng"]`` and
    ``out["rng_meta"]`` are None where the world size differs: the generators of another number
    of processes are not this run's."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete l2p checkpoint (no state.json)")
    state = _read_json(path / "state.json")
    saved_world = int(state.get("world_size", 1))
    same_world = world_size is None or world_size == saved_world
    sharded = bool(state.get("sharded"))
    own_shards = sharded and same_world and fsdp
    out = {"state": state, "whole": not own_shards, "rng": None, "rng_meta": None}
    if same_world:
        rng_file = path / f"rng-rank{rank}.safetensors"
        out["rng"] = _read_tensors(rng_file)
        out["rng_meta"] = _read_json(path / f"rng-rank{rank}.json")
    if not sharded:
        read = lambda stem: _read_tensors(path / f"{stem}.safetensors")  # noqa: E731
    elif own_shards:
        read = lambda stem: _read_tensors(path / f"{stem}-rank{rank}.safetensors")  # noqa: E731
    else:
        read = lambda stem: _join_shards(path, stem, saved_world)  # noqa: E731
    out["trainable"] = read("trainable")
    out["optimizer"] = read("optimizer")
    out["optimizer_meta"] = _read_json(path / (f"optimizer-rank{rank if own_shards else 0}.json" if sharded
                                               else "optimizer.json"))
    has_ema = (path / ("ema-rank0.safetensors" if sharded else "ema.safetensors")).is_file()
    out["ema"] = read("ema") if has_ema else None
    return out


def _join_shards(path: Path, stem: str, world_size: int) -> dict[str, torch.Tensor]:
    """Whole tensors from the FSDP2 shards ``<stem>-rank<R>.safetensors`` of ``world_size``
    ranks: the dim-0 pieces in rank order, concatenated (0-dim tensors, such as AdamW's step,
    are the same on every rank)."""
    parts = [_read_tensors(path / f"{stem}-rank{r}.safetensors") for r in range(world_size)]
    for r, part in enumerate(parts[1:], start=1):
        if part.keys() != parts[0].keys():
            raise ValueError(f"{path / f'{stem}-rank{r}.safetensors'} holds other tensors than rank 0's: the "
                             f"checkpoint {path} is damaged; delete it to resume from the one before")
    return {k: v if v.dim() == 0 else torch.cat([p[k] for p in parts]) for k, v in parts[0].items()}


@contextlib.contextmanager
def _reading(file: Path):
    """A missing or damaged checkpoint file is a ValueError naming it and what to do."""
    try:
        yield
    except FileNotFoundError:
        raise ValueError(f"{file} is missing: the checkpoint {file.parent} is incomplete; delete it to "
                         "resume from the one before") from None
    except Exception as exc:  # safetensors and json raise their own error types
        raise ValueError(f"{file} is damaged ({type(exc).__name__}: {exc}); delete the checkpoint "
                         f"{file.parent} to resume from the one before") from None


def _read_json(file: Path):
    with _reading(file):
        return json.loads(file.read_text())


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    with _reading(file):
        return load_file(str(file))
