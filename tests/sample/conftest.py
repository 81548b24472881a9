"""Converted tiny pipelines (PixArt-Sigma, SD3, FLUX; random weights, pixel patch 4) shared by
the sampling tests, built once per session with ``l2p.conversion.convert_folder``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent.parent
for sub in ("train", "conversion"):  # the tiny SD3 / FLUX builders and the per-family configs
    if str(_TESTS / sub) not in sys.path:
        sys.path.insert(0, str(_TESTS / sub))

FAMILIES = ("pixart", "sd3", "flux")
HEAD = {"type": "detailer", "channels": [8, 16]}


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    import _trainkit as kit

    root = tmp_path_factory.mktemp("sources")
    return {name: kit.BUILDERS[name](root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def converted(sources, tmp_path_factory) -> dict[str, Path]:
    from l2p.conversion import convert_folder

    root = tmp_path_factory.mktemp("converted")
    for name, src in sources.items():
        convert_folder(src, root / name, head=HEAD, seed=1)
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="session")
def pipelines(converted):
    from l2p import L2PPipeline

    out = {}
    for name, path in converted.items():
        pipe = L2PPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out
