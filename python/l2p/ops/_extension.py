"""Loading the compiled extension ``l2p._C``, which registers the ``torch.ops.l2p`` kernels.

The package stays importable without it (the pure-PyTorch references then serve every op);
asking explicitly for a compiled backend without it is an error that says how to build it.
"""

from __future__ import annotations

from typing import Any

import torch


def _load() -> tuple[Any, str | None]:
    try:
        from l2p import _C  # noqa: PLC0415 - importing registers the kernels
    except ImportError as exc:
        return None, str(exc)
    return _C, None


# Loaded once at import, so that the dispatch decisions below are plain constants that
# torch.compile can trace through.
_EXT, _LOAD_ERROR = _load()


def _registered_kernels() -> frozenset[tuple[str, str]]:
    if _EXT is None:
        return frozenset()
    ops = ("patch_embed", "unpatchify", "patch_weight_grad", "attention_forward",
           "attention_backward")
    return frozenset(
        (op, device)
        for op in ops
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"l2p::{op}", key)
    )


# (op name, device type) pairs that have a compiled kernel, e.g. ("attention_forward", "cpu").
REGISTERED_KERNELS = _registered_kernels()


def is_compiled() -> bool:
    """True when ``l2p._C`` was built and imports."""
    return _EXT is not None


def has_cuda_kernels() -> bool:
    return is_compiled() and bool(build_info()["cuda"])


def build_info() -> dict[str, Any]:
    """How the extension was built: ``cuda``, ``cuda_archs``, ``cutlass`` (the kernels built on
    CUTLASS are in; then also ``unpatchify_fused_default``), ``cpu_gemm``, ``torch_version``."""
    if _EXT is None:
        return {"cuda": False, "cuda_archs": "", "cutlass": False, "cpu_gemm": None, "torch_version": None,
                "error": _LOAD_ERROR}
    return dict(_EXT.build_info())


def require_compiled(backend: str) -> None:
    if _EXT is None:
        raise RuntimeError(
            f"backend={backend!r} needs the compiled extension l2p._C, which failed to import "
            f"({_LOAD_ERROR}). Reinstall with `pip install --no-build-isolation .` from the l2p "
            "source tree, or use backend='torch'."
        )
