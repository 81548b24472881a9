"""Fixtures of the trainer tests: tiny source pipelines (built once per session), a small
image folder, and a config builder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _trainkit import BUILDERS, FAMILIES, make_images  # noqa: E402


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: BUILDERS[name](root / name) for name in FAMILIES}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", n=8)
