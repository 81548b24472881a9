"""Fixtures of the data tests: one tiny PixArt-Sigma pipeline folder per session."""

from __future__ import annotations

import pytest

from l2p.testing import build_tiny_pixart_sigma_pipeline


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    """Folder of a tiny PixArt-Sigma pipeline saved with safetensors."""
    path = tmp_path_factory.mktemp("tiny-pixart-sigma")
    build_tiny_pixart_sigma_pipeline(path)
    return path
