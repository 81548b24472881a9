"""Which implementation runs an op: ``backend="auto"|"cpp"|"cuda"|"torch"``.

"auto" consults AUTO_RULES, one entry per (op, device type): the dtypes for which the
compiled kernel beat the torch way in bench/ (see bench/RESULTS.md for the figures). Where
no rule matches, or the extension is not built, "auto" takes the torch way, so no user is
slower than plain torch.
"""

from __future__ import annotations

import torch

from l2p.ops import _extension

BACKENDS = ("auto", "cpp", "cuda", "torch")
OPS = ("patch_embed", "unpatchify", "attention")

_ALL_FLOATS = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

# (op, device type) -> dtypes whose compiled kernel is the fastest measured path.
AUTO_RULES: dict[tuple[str, str], frozenset[torch.dtype]] = {
    ("patch_embed", "cpu"): _ALL_FLOATS,
    ("unpatchify", "cpu"): _ALL_FLOATS,
    # CPU attention (bench/test_bench_attention.py, 2 cores, N=1024-4096): float32 forward at
    # parity with SDPA and forward+backward 1.06x; float16 1.6x / 8x; bfloat16 (SDPA runs
    # bf16 GEMMs) and float64 were slower, so they stay with torch.
    ("attention", "cpu"): frozenset({torch.float32, torch.float16}),
    # Measured on an H200 in bf16 (fp16 runs the same kernels), 10 calls back to back as inside
    # a model: at 4096^2, p=16 patch_embed 0.57 ms against Conv2d's 17 ms and unfold + addmm's
    # 0.61, unpatchify 0.52 ms against Linear+permute's 0.63; at 2048^2 1.14-1.18x torch. A lone
    # call at 2048^2 waits on host work and can come out slower than torch's (bench/RESULTS.md).
    # Attention on CUDA stays with torch: on an H200 with torch 2.11, SDPA left to choose runs at
    # cuDNN's speed (forward 589-614 TFLOP/s, forward+backward 548-570 at Dh=128), 1.4-1.9x ours
    # (forward 330-411, forward+backward 342-388), although ours beats its flash backend
    # (1.0-1.2x forward, 1.20-1.24x forward+backward; bench/RESULTS.md).
    ("patch_embed", "cuda"): frozenset({torch.bfloat16, torch.float16}),
    ("unpatchify", "cuda"): frozenset({torch.bfloat16, torch.float16}),
}

# Device type each compiled backend serves.
_COMPILED_DEVICE = {"cpp": "cpu", "cuda": "cuda"}


_COMPILED_FOR_DEVICE = {dev: backend for backend, dev in _COMPILED_DEVICE.items()}


def _kernel_registered(op: str, device_type: str) -> bool:
    kernel = "attention_forward" if op == "attention" else op
    return (kernel, device_type) in _extension.REGISTERED_KERNELS


def auto_choice(op: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend "auto" picks for this op on this device type and dtype."""
    compiled = _COMPILED_FOR_DEVICE.get(device_type)
    if compiled is None or not _kernel_registered(op, device_type):
        return "torch"
    if dtype in AUTO_RULES.get((op, device_type), frozenset()):
        return compiled
    return "torch"


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Check an explicit backend against the inputs, or resolve "auto"."""
    try:
        return _RESOLVED[(op, backend, device.type, dtype)]
    except (KeyError, TypeError):   # not decided in advance, or an unhashable backend
        return _resolve(op, backend, device, dtype)


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return auto_choice(op, device.type, dtype)
    if backend == "torch":
        return backend
    _extension.require_compiled(backend)
    wanted = _COMPILED_DEVICE[backend]
    if device.type != wanted:
        raise ValueError(
            f"backend={backend!r} runs on {wanted} tensors but the inputs are on {device}; "
            f"move them or use backend='auto'"
        )
    if not _kernel_registered(op, wanted):
        raise RuntimeError(
            f"l2p was built without a {backend} kernel for {op}; rebuild with "
            + ("L2P_CUDA=1 against a CUDA build of torch" if backend == "cuda" else "the default settings")
            + " or use backend='auto'"
        )
    return backend


def _decide_in_advance() -> dict[tuple[str, str, str, torch.dtype], str]:
    """Every choice that succeeds for the ops, backends, device types and float dtypes, decided
    once at import (the rules and the registered kernels are fixed by then): a call's choice is
    then one lookup instead of about a microsecond of checks. Anything else, including every
    choice that raises, goes through :func:`_resolve` each time."""
    decided = {}
    for op in OPS:
        for backend in BACKENDS:
            for device_type in _COMPILED_FOR_DEVICE:
                for dtype in _ALL_FLOATS:
                    try:
                        decided[(op, backend, device_type, dtype)] = _resolve(
                            op, backend, torch.device(device_type), dtype)
                    except (RuntimeError, ValueError):
                        pass
    return decided


_RESOLVED = _decide_in_advance()
