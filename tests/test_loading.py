"""torch_dtype is honoured for every diffusers model l2p loads, with or without accelerate:
diffusers 0.42 without it kept a float32 SD3 checkpoint in float32 when asked for bfloat16."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))


def test_sd3_source_loads_in_the_dtype_asked_for(tmp_path):
    import _trainkit as kit

    from l2p.data.generate import load_pipeline
    from l2p.train.source import open_source

    folder = kit.BUILDERS["sd3"](tmp_path / "sd3")
    source = open_source(str(folder))
    dtypes = {p.dtype for p in source.load_transformer(torch.bfloat16).parameters()}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in source.load_vae_encoder(torch.bfloat16).parameters()} == {torch.bfloat16}
    pipe = load_pipeline(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    # float32 stays float32.
    assert {p.dtype for p in source.load_transformer(torch.float32).parameters()} == {torch.float32}
