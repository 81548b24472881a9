"""``l2p info``: what was compiled and what backend="auto" picks for each op."""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from l2p import __version__
from l2p.ops import _dispatch, _extension

_OPS = ("patch_embed", "unpatchify", "attention")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def collect() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    auto = {
        op: {
            dev: {str(dt).removeprefix("torch."): _dispatch.auto_choice(op, dev, dt) for dt in _DTYPES}
            for dev in devices
        }
        for op in _OPS
    }
    info = {
        "l2p": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "extension": _extension.build_info(),
        "auto": auto,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_attention"] = _cuda_attention(info["extension"])
        info["cuda_unpatchify"] = _cuda_unpatchify(info["extension"])
    info["toy_source"] = _toy_source()
    return info


def _runs_sm90a(ext: dict) -> bool:
    return torch.cuda.get_device_capability() == (9, 0) and "9.0a" in (ext.get("cuda_archs") or "")


def _cuda_unpatchify(ext: dict) -> str:
    """Which unpatchify kernel backend="cuda" runs on this GPU (the choice
    csrc/unpatchify/cuda/unpatchify_cuda.cpp makes, in words)."""
    if not ext.get("cuda"):
        return "none (built without CUDA kernels)"
    general = "cuBLAS GEMM per chunk of tokens, then a fold into the image"
    if not _runs_sm90a(ext):
        return general
    if not ext.get("cutlass"):
        return general + " (built without the CUTLASS headers: no Hopper fused GEMM)"
    switch = os.environ.get("L2P_UNPATCHIFY_FUSED")
    on = {"1": True, "0": False}.get(switch, bool(ext.get("unpatchify_fused_default")))
    if not on:  # csrc/unpatchify/cuda/fused_default.h: off while slower than cuBLAS + fold
        how = "L2P_UNPATCHIFY_FUSED=0" if switch == "0" else "L2P_UNPATCHIFY_FUSED=1 turns it on"
        return f"{general} (the Hopper fused GEMM is off; {how})"
    return ("Hopper fused GEMM writing the image (CUTLASS mainloop) for bf16 / fp16 with a "
            f"power-of-two patch and D a multiple of 8, else {general}")


def _cuda_attention(ext: dict) -> str:
    """Which of l2p's attention kernels backend="cuda" runs on this GPU (the choice
    csrc/attention/cuda/attention_cuda.cpp makes, in words)."""
    if not ext.get("cuda"):
        return "none (built without CUDA kernels)"
    general = "mma.sync / WMMA tensor-core kernels for bf16 / fp16, CUDA-core ones otherwise"
    if not _runs_sm90a(ext):
        return general
    forward = os.environ.get("L2P_ATTENTION_WGMMA") != "0"
    backward = forward and os.environ.get("L2P_ATTENTION_WGMMA_BACKWARD") != "0"
    if not forward:
        return general + " (the Hopper wgmma kernels are off: L2P_ATTENTION_WGMMA=0)"
    hopper = "Hopper wgmma forward" + (" and backward" if backward else "")
    note = "" if backward else " (the wgmma backward is off: L2P_ATTENTION_WGMMA_BACKWARD=0)"
    return f"{hopper} for unmasked bf16 / fp16 with head dims up to 128, else {general}{note}"


def _toy_source() -> dict:
    """Whether the package ships the toy source, and what its training record says."""
    from l2p.toy.source import SHIPPED_SOURCE_DIR

    record_file = SHIPPED_SOURCE_DIR / "training_record.json"
    if not (SHIPPED_SOURCE_DIR / "model_index.json").is_file() or not record_file.is_file():
        return {"shipped": False}
    record = json.loads(record_file.read_text())
    heldout = (record.get("eval") or {}).get("heldout") or {}
    # A source trained further (--init-from) nests the record of the run it continued, and
    # records the time of all its runs.
    runs, run = [], record
    while run:
        runs.append(run)
        run = run.get("continued_from")
    return {"shipped": True, "path": str(SHIPPED_SOURCE_DIR), "device": record.get("device"),
            "runs": len(runs), "devices": list(dict.fromkeys(r.get("device") for r in reversed(runs))),
            "seconds": record.get("total_seconds", record.get("seconds")), "heldout_score": heldout.get("overall"),
            "heldout_ci95": heldout.get("ci95")}


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    print(f"l2p {info['l2p']}  (python {info['python']}, torch {info['torch']}, "
          f"CUDA {info['torch_cuda'] or 'none'})")
    if "error" in ext:
        print(f"compiled extension: NOT AVAILABLE ({ext['error']})")
    else:
        archs = ext["cuda_archs"] or "-"
        print(f"compiled extension: CPU kernels yes (gemm: {ext['cpu_gemm']}), "
              f"CUDA kernels {'yes' if ext['cuda'] else 'no'} (archs: {archs}), "
              f"built against torch {ext['torch_version']}")
    print(f"CPU threads: {info['cpu_threads']}" + (f"; GPU: {info['gpu']}" if "gpu" in info else ""))
    if "cuda_attention" in info:
        print(f'attention with backend="cuda" on this GPU: {info["cuda_attention"]}')
        print(f'unpatchify with backend="cuda" on this GPU: {info["cuda_unpatchify"]}')
    toy = info["toy_source"]
    if toy["shipped"]:
        score = (f"held-out score {toy['heldout_score']:.3f} (95% CI {toy['heldout_ci95'][0]:.3f}-"
                 f"{toy['heldout_ci95'][1]:.3f})" if toy["heldout_score"] is not None else "not scored")
        where = (f"on {toy['device']}" if toy["runs"] == 1
                 else f"in {toy['runs']} runs on {', '.join(map(str, toy['devices']))}")
        print(f"toy source: shipped, {score}, trained {toy['seconds'] / 60:.0f} min {where}")
    else:
        print("toy source: not shipped (l2p-train with no arguments needs it; see `l2p toy train-source`)")
    print('backend="auto" picks:')
    for op, per_device in info["auto"].items():
        for dev, per_dtype in per_device.items():
            picks = ", ".join(f"{dt}={b}" for dt, b in per_dtype.items())
            print(f"  {op:12s} {dev:5s} {picks}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show the build and the backends 'auto' picks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
