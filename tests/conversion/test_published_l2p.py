"""A checkpoint in the published L2P layout, made here from a tiny Z-Image, converted with
``l2p convert --published-l2p``: the pixel model computes what the published model computes.

The reference is built independently of l2p's splice: diffusers' own ZImageTransformer2DModel
configured for pixels (patch 16, 3 channels), whose last block's output feeds a decoder written
here from the layout the public ports read (see l2p/conversion/published_l2p.py)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from l2p.cli import main

from _families import TINY, call_kwargs
from _published import write_published

Z_IMAGE = "ZImageTransformer2DModel"
CHANNELS = [4, 8, 8, 16]  # four levels: P = 16


def _published(tmp_path, *, drop=None, prefix=""):
    """A tiny published-layout checkpoint: (path, pixel-space Z-Image, decoder)."""
    path = tmp_path / "l2p-z-image.safetensors"
    pixel_dit, decoder = write_published(path, TINY[Z_IMAGE], 16, CHANNELS, drop=drop, prefix=prefix)
    return path, pixel_dit, decoder


def _source(tmp_path):
    torch.manual_seed(3)
    folder = tmp_path / "z-image"
    getattr(diffusers, Z_IMAGE).from_config(TINY[Z_IMAGE]).save_pretrained(folder)
    return folder


def _reference(pixel_dit, decoder, x, kwargs):
    """The published model's prediction (x0 - noise): the last block's image tokens as a grid
    into the decoder."""
    seen = {}
    final = pixel_dit.all_final_layer["16-1"]
    hook = final.register_forward_pre_hook(lambda m, args, kw=None: seen.update(features=args[0]))
    try:
        pixel_dit([img.unsqueeze(1) for img in x], kwargs["t"], kwargs["cap_feats"], patch_size=16)
    finally:
        hook.remove()
    rows, cols = x.shape[2] // 16, x.shape[3] // 16
    tokens = seen["features"][:, :rows * cols]  # the image tokens lead the unified sequence
    grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)
    return decoder(x, grid)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])  # as saved, or in ComfyUI's file layout
def test_converted_published_checkpoint_computes_the_published_model(tmp_path, capsys, prefix):
    from l2p.models import PixelTransformer2DModel

    path, pixel_dit, decoder = _published(tmp_path, prefix=prefix)
    out = tmp_path / "pixel"
    assert main(["convert", "--source", str(_source(tmp_path)), "--out", str(out),
                 "--published-l2p", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "loaded" in printed and "all_final_layer.16-1" in printed  # read, and said unused
    model = PixelTransformer2DModel.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["patch_size"] == 16
    assert config["head_config"] == {"type": "detailer", "channels": CHANNELS, "pool": "max",
                                     "up_convs": True, "features": "blocks"}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 48, generator=gen)
    kwargs = call_kwargs(Z_IMAGE, 2, 32, 48, gen)
    with torch.no_grad():
        expected = _reference(pixel_dit, decoder, x, kwargs)
        got = model(x, **kwargs).sample
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The published prediction is x0 - noise, ZImageTransformer2DModel's sign: the pipeline's
    # negation then gives the scheduler noise - x0, as for the latent source.
    assert model.output_sign == -1


def test_published_checkpoint_mistakes_are_one_line_errors(tmp_path, capsys):
    source = _source(tmp_path)
    path, _, _ = _published(tmp_path, drop="layers.0.attention.to_q.weight")
    assert main(["convert", "--source", str(source), "--out", str(tmp_path / "a"),
                 "--published-l2p", str(path)]) == 2
    assert "lacks 1 tensors the model needs (transformer.layers.0.attention.to_q.weight)" in capsys.readouterr().err
    path, _, _ = _published(tmp_path)
    assert main(["convert", "--source", str(source), "--out", str(tmp_path / "b"),
                 "--published-l2p", str(path), "--patch-size", "32"]) == 2
    assert "trained at 16" in capsys.readouterr().err
    sd3 = tmp_path / "sd3"
    diffusers.SD3Transformer2DModel.from_config(TINY["SD3Transformer2DModel"]).save_pretrained(sd3)
    assert main(["convert", "--source", str(sd3), "--out", str(tmp_path / "c"),
                 "--published-l2p", str(path)]) == 2
    assert "not available for SD3Transformer2DModel" in capsys.readouterr().err
    assert main(["convert", "--source", str(source), "--out", str(tmp_path / "d"),
                 "--published-l2p", str(source / "config.json")]) == 2
    assert "safetensors files only" in capsys.readouterr().err
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_blocks_features_need_a_mapped_final_layer():
    import l2p

    source = diffusers.PixArtTransformer2DModel.from_config(TINY["PixArtTransformer2DModel"])
    with pytest.raises(ValueError, match="features 'blocks' is not available for PixArtTransformer2DModel"):
        l2p.convert_to_pixel(source, head={"type": "detailer", "features": "blocks"})


def test_the_converted_folder_stores_each_tensor_as_the_checkpoint_does(tmp_path):
    # The published files mix float32 and bfloat16; a bf16 source must not round the float32
    # ones, nor a float32 source widen the bf16 ones.
    from safetensors.torch import load_file

    from l2p.conversion import convert_folder

    path, _, _ = _published(tmp_path)
    tensors = load_file(str(path))
    mixed = {k: v.to(torch.bfloat16) if k.startswith("local_decoder.") or "adaLN" in k else v
             for k, v in tensors.items()}
    save_file(mixed, str(path))
    source = _source(tmp_path)
    for weights in source.glob("*.safetensors"):  # the source stored in bf16
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))
    convert_folder(source, tmp_path / "out", published_l2p=path, log=lambda _: None)
    stored = {}
    for weights in (tmp_path / "out").glob("*.safetensors"):
        stored.update(load_file(str(weights)))
    to_q = "layers.0.attention.to_q.weight"
    assert stored[f"transformer.{to_q}"].dtype == torch.float32
    assert torch.equal(stored[f"transformer.{to_q}"], mixed[to_q])
    assert stored["head.encoder.0.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["head.proj_out.weight"], -mixed["local_decoder.out_conv.weight"])
