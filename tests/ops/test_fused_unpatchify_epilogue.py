"""The Hopper fused unpatchify's epilogue, checked on the CPU: tests/ops/cuda_host/
fused_unpatchify_epilogue.cu drives it (host-callable, with the kernel's own TiledMma fragment
layout) over every tile and thread of a problem and compares the image with unpatchify's
definition, pixel by pixel. The GPU tests (test_cuda_ops.py) run the whole kernel; this one
runs wherever nvcc and the CUTLASS headers are, so CI checks the index arithmetic and the pair
stores of a kernel it cannot run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cutlass_headers  # cmake/, on the path through conftest.py
import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")

# (B, C, H, W, p, with_bias): a tile row inside one image; a batch whose images split a tile and
# features filling three 256-wide tiles; p = 2 (a tile far wider than the 12 features); p = 32 /
# 64; p = 4 with four channels.
CASES = [
    (1, 3, 256, 256, 16, 1),
    (2, 3, 96, 160, 16, 0),
    (3, 2, 24, 24, 2, 1),
    (1, 3, 128, 128, 32, 1),
    (2, 3, 128, 256, 64, 0),
    (1, 4, 64, 96, 4, 1),
]


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Path:
    include = cutlass_headers.find()
    assert include is not None, (
        "no CUTLASS headers: run `python cmake/cutlass_headers.py fetch` (make install does)")
    exe = tmp_path_factory.mktemp("fused_unpatchify") / "check"
    done = subprocess.run(
        [NVCC, "-std=c++17", "-O1", "-DNDEBUG", "--expt-relaxed-constexpr", "-arch=sm_90a",
         f"-I{ROOT / 'csrc'}", f"-I{include}",
         str(ROOT / "tests/ops/cuda_host/fused_unpatchify_epilogue.cu"), "-o", str(exe)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return exe


@pytest.mark.parametrize("schedule", ["cooperative", "pingpong"])
@pytest.mark.parametrize("element", ["float", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_epilogue_writes_every_pixel_once_with_its_value(checker, element, schedule, case):
    done = subprocess.run([str(checker), element, schedule, *map(str, case)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr
