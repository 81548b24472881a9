"""The CUTLASS / CuTe headers that CUDA builds compile the Hopper unpatchify GEMM against.

They come from the nvidia-cutlass wheel on PyPI, whose headers are all the build needs; its
Python tooling and that tooling's dependencies (cuda-python, scipy, ...) are not. So rather
than installing it, ``fetch`` downloads the pinned wheel and unpacks only its include folder
into build/cutlass/include:

    python cmake/cutlass_headers.py fetch     # what `make install` runs
    python cmake/cutlass_headers.py find      # prints where the build will look

``find`` (used by setup.py and by CI's nvcc compile check) looks, in order, at $CUTLASS_INCLUDE,
build/cutlass/include, and an installed nvidia-cutlass (package cutlass_library).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "4.2.0.0"
ROOT = Path(__file__).resolve().parents[1]
FETCHED = ROOT / "build" / "cutlass" / "include"
_WHEEL_INCLUDE = "cutlass_library/source/include/"


def _has_headers(include: Path) -> bool:
    return (include / "cutlass" / "cutlass.h").is_file() and (include / "cute" / "tensor.hpp").is_file()


def find() -> Path | None:
    """The first folder holding the CUTLASS and CuTe headers, or None."""
    candidates = []
    if os.environ.get("CUTLASS_INCLUDE"):
        candidates.append(Path(os.environ["CUTLASS_INCLUDE"]))
    candidates.append(FETCHED)
    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "source" / "include")
    return next((c for c in candidates if _has_headers(c)), None)


def fetch() -> Path:
    """Download nvidia-cutlass==VERSION (no dependencies) and unpack its headers into FETCHED,
    unless a fetch of this version is already there. The folder appears whole or not at all."""
    stamp = FETCHED.parent / "VERSION"
    if _has_headers(FETCHED) and stamp.is_file() and stamp.read_text().strip() == VERSION:
        return FETCHED
    FETCHED.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=FETCHED.parent.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", tmp, f"nvidia-cutlass=={VERSION}"], check=True)
        wheel = next(Path(tmp).glob("nvidia_cutlass-*.whl"))
        staged = Path(tmp) / "cutlass"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(_WHEEL_INCLUDE) and not member.endswith("/"):
                    target = staged / "include" / member[len(_WHEEL_INCLUDE):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
        (staged / "VERSION").write_text(VERSION + "\n")
        if not _has_headers(staged / "include"):
            raise SystemExit(f"nvidia-cutlass=={VERSION} has no {_WHEEL_INCLUDE}cutlass/cutlass.h")
        shutil.rmtree(FETCHED.parent, ignore_errors=True)
        staged.rename(FETCHED.parent)
    return FETCHED


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "find"
    if command == "fetch":
        print(fetch())
    elif command == "find":
        found = find()
        print(found if found else "no CUTLASS headers (python cmake/cutlass_headers.py fetch)")
        sys.exit(0 if found else 1)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} [fetch|find]")
