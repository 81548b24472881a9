"""The toy source shipped inside the package: a diffusers pipeline folder within the size
limit, with the record of the run that made it and its measured scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2p.toy import source

pytestmark = pytest.mark.skipif(not (source.SHIPPED_SOURCE_DIR / "model_index.json").is_file(),
                                reason="this checkout ships no toy source")


def test_shipped_source_is_small_and_recorded():
    files = [p for p in source.SHIPPED_SOURCE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    record = json.loads((source.SHIPPED_SOURCE_DIR / "training_record.json").read_text())
    for key in ("command", "seconds", "device", "torch", "steps_run", "vae_reconstruction"):
        assert record[key], key
    for split in ("heldout", "train"):
        low, high = record["eval"][split]["ci95"]
        assert low <= record["eval"][split]["overall"] <= high


def test_shipped_source_loads_with_diffusers_and_generates():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source.SHIPPED_SOURCE_DIR, local_files_only=True,
                                             use_safetensors=True)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    images = source.generate(pipe, ["a red circle", "two blue squares"], seed=0, steps=4)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0
