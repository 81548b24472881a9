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


def test_a_pixel_folder_of_mixed_dtypes_loads_in_the_widest_and_runs(tmp_path):
    """What l2p merge writes for a float32 delta over a bf16 base: without torch_dtype the
    model loads in float32 (exact) instead of half-and-half, which no layer can run."""
    import diffusers
    from safetensors.torch import load_file, save_file

    import l2p
    from l2p.models import PixelTransformer2DModel

    sys.path.insert(0, str(Path(__file__).resolve().parent / "conversion"))
    from _families import TINY, call_kwargs

    torch.manual_seed(0)
    source = diffusers.PixArtTransformer2DModel.from_config(TINY["PixArtTransformer2DModel"])
    pixel = l2p.convert_to_pixel(source, head={"type": "detailer", "channels": [4, 8, 8, 16]})
    pixel.save_pretrained(tmp_path / "mixed")
    for weights in (tmp_path / "mixed").glob("*.safetensors"):
        tensors = load_file(str(weights))
        save_file({k: v.to(torch.bfloat16) if "transformer_blocks" in k else v for k, v in tensors.items()},
                  str(weights), metadata={"format": "pt"})
    loaded = PixelTransformer2DModel.from_pretrained(tmp_path / "mixed")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 48, generator=gen)
    with torch.no_grad():
        assert torch.isfinite(loaded(x, **call_kwargs("PixArtTransformer2DModel", 1, 32, 48, gen)).sample).all()
    halves = PixelTransformer2DModel.from_pretrained(tmp_path / "mixed", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in halves.parameters()} == {torch.bfloat16}
