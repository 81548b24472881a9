"""Shared fixtures: every op test runs on each available device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The build's helper scripts (cmake/cutlass_headers.py: where the CUTLASS headers are), which
# the CUDA compile checks use exactly as setup.py does.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cmake"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each test that takes ``device`` runs once per available device (CPU, and CUDA on a
    GPU machine)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tests of tiny models run on one torch thread: on a shared 2-core machine intra-op
    threads only add contention (measured 10x slower under load). The op tests keep torch's
    threads, since they exercise the kernels' parallel paths."""
    if "ops" in request.node.path.parts:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compiled_backend(device: str) -> str:
    """The explicit compiled backend for ``device``: "cpp" on the CPU, "cuda" on a GPU."""
    return "cuda" if device == "cuda" else "cpp"
