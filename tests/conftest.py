"""Shared fixtures: every op test runs on each available device."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each test that takes ``device`` runs once per available device (CPU, and CUDA on a
    GPU machine)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def compiled_backend(device: str) -> str:
    """The explicit compiled backend for ``device``: "cpp" on the CPU, "cuda" on a GPU."""
    return "cuda" if device == "cuda" else "cpp"
