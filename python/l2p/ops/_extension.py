"""Loading the compiled extension ``l2p._C``, which registers the ``torch.ops.l2p`` kernels.

The package stays importable without it (the pure-PyTorch references then serve every op);
asking explicitly for a compiled backend without it is an error that says how to build it.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _load() -> tuple[Any, str | None]:
    try:
        from l2p import _C  # noqa: PLC0415 - importing registers the kernels
    except ImportError as exc:
        return None, str(exc)
    return _C, None


def is_compiled() -> bool:
    """True when ``l2p._C`` was built and imports."""
    return _load()[0] is not None


def has_cuda_kernels() -> bool:
    return is_compiled() and bool(build_info()["cuda"])


def build_info() -> dict[str, Any]:
    """How the extension was built: ``cuda``, ``cuda_archs``, ``cpu_gemm``, ``torch_version``."""
    ext, error = _load()
    if ext is None:
        return {"cuda": False, "cuda_archs": "", "cpu_gemm": None, "torch_version": None,
                "error": error}
    return dict(ext.build_info())


def require_compiled(backend: str) -> None:
    ext, error = _load()
    if ext is None:
        raise RuntimeError(
            f"backend={backend!r} needs the compiled extension l2p._C, which failed to import "
            f"({error}). Reinstall with `pip install --no-build-isolation .` from the l2p "
            "source tree, or use backend='torch'."
        )
