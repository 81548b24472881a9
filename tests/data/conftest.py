"""Fixtures of the data tests: one tiny PixArt-Sigma pipeline folder per session, and a
single torch thread (the tiny models are latency-bound; on shared 2-core machines more
threads only add contention)."""

from __future__ import annotations

import pytest
import torch

from l2p.testing import build_tiny_pixart_sigma_pipeline


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    """Folder of a tiny PixArt-Sigma pipeline saved with safetensors."""
    path = tmp_path_factory.mktemp("tiny-pixart-sigma")
    build_tiny_pixart_sigma_pipeline(path)
    return path
