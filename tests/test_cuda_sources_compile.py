"""Every CUDA source compiles for sm_80 and sm_90a with nvcc alone (no GPU, no CUDA build of
torch): kernels and their launchers live in .cu files that include only CUDA headers, so this
catches a broken kernel on a CPU machine. Skipped where nvcc is not on the PATH."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cutlass_headers  # cmake/, on the path through conftest.py
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("csrc/*/cuda/*.cu"))
NVCC = shutil.which("nvcc")
ARCH_FLAGS = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90a,code=sm_90a",
]
# Headers a .cu may not include: they need a CUDA build of torch (see BUILD-NOTES).
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](ATen|c10|torch)/', re.MULTILINE)

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")


def _uses_cutlass(source: Path) -> bool:
    return source.name.endswith("_sm90.cu")  # CMakeLists.txt's L2P_CUTLASS_SOURCES


def _compile(source: Path, out_dir: Path) -> tuple[int, str]:
    extra: list[str] = []
    if _uses_cutlass(source):
        include = cutlass_headers.find()
        if include is None:
            return 1, "no CUTLASS headers: run `python cmake/cutlass_headers.py fetch` (make install does)"
        # As CMake compiles it in a Release build.
        extra = [f"-I{include}", "--expt-relaxed-constexpr", "-DNDEBUG"]
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", *ARCH_FLAGS, f"-I{ROOT / 'csrc'}", *extra,
        str(source), "-o", str(out_dir / (source.stem + ".o")),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[Path, tuple[int, str]]:
    """Compile every source once, two at a time (the CI machines have two cores)."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda s: _compile(s, out_dir), SOURCES)
        return dict(zip(SOURCES, results))


def test_there_are_cuda_sources():
    assert SOURCES, "no csrc/*/cuda/*.cu found"


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: str(s.relative_to(ROOT)))
def test_source_includes_only_cuda_headers(source: Path):
    match = TORCH_INCLUDE.search(source.read_text())
    assert match is None, (
        f"{source.name} includes {match.group(0).strip()}; keep torch headers in the .cpp "
        "next to it (BUILD-NOTES: such a .cu does not compile on the CPU machines)"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: str(s.relative_to(ROOT)))
def test_source_compiles(compiled, source: Path):
    returncode, output = compiled[source]
    assert returncode == 0, f"nvcc failed on {source.name}:\n{output}"
