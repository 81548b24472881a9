"""``l2p convert`` and ``l2p merge`` on transformer and pipeline folders."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

import l2p
from l2p.cli import main as cli

from _families import TINY

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _tiny_vae(factor_levels: int = 4):
    return diffusers.AutoencoderKL(
        block_out_channels=(8,) * factor_levels, down_block_types=("DownEncoderBlock2D",) * factor_levels,
        up_block_types=("UpDecoderBlock2D",) * factor_levels, latent_channels=4, norm_num_groups=4,
        layers_per_block=1,
    )


def test_convert_transformer_folder_matches_in_memory_conversion(tmp_path):
    name = "SD3Transformer2DModel"
    source = getattr(diffusers, name).from_config(TINY[name])
    source.save_pretrained(tmp_path / "src", safe_serialization=True)
    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "px"), "--seed", "4"]) == 0
    loaded = l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "px")
    expected = l2p.convert_to_pixel(source, seed=4).state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_convert_keeps_the_stored_dtype_and_patch_override(tmp_path):
    name = "FluxTransformer2DModel"
    source = getattr(diffusers, name).from_config(TINY[name]).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "src", safe_serialization=True)
    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "px"),
                "--patch-size", "32"]) == 0
    config = json.loads((tmp_path / "px" / "config.json").read_text())
    assert config["patch_size"] == 32
    state = l2p.conversion.folders.load_state(tmp_path / "px")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_convert_pipeline_folder_drops_the_vae(tmp_path):
    transformer = diffusers.DiTTransformer2DModel.from_config(TINY["DiTTransformer2DModel"])
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=diffusers.DDIMScheduler(),
                                 id2label={0: "cat", 1: "dog"})
    pipe.save_pretrained(tmp_path / "src")
    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "px")]) == 0
    out = tmp_path / "px"
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["l2p", "PixelTransformer2DModel"]
    assert index["vae"] == [None, None]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["_l2p"]["source_pipeline"] == "DiTPipeline"
    assert index["_l2p"]["patch_size"] == 16 and index["_l2p"]["vae_scale_factor"] == 8
    assert index["_l2p"]["prediction"] == "epsilon" and index["_l2p"]["output_sign"] == 1
    # diffusers itself reads it (the VAE passed as None) and finds our class.
    loaded = diffusers.DiffusionPipeline.from_pretrained(out, vae=None)
    assert isinstance(loaded.transformer, l2p.PixelTransformer2DModel)
    assert isinstance(loaded.scheduler, diffusers.DDIMScheduler)

    # Merge onto the pipeline folder: a pipeline folder with the merged transformer.
    model = loaded.transformer
    l2p.set_trainable(model, "first_last:1")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    l2p.save_delta(model, tmp_path / "d.safetensors")
    assert cli(["merge", "--base", str(out), "--delta", str(tmp_path / "d.safetensors"),
                "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "scheduler").is_dir()
    merged = l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "merged" / "transformer")
    for key, value in model.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def test_pipeline_prediction_follows_the_scheduler(tmp_path):
    # A PixArt transformer trained for flow (the toy source): the folder must record "flow",
    # not the family's usual epsilon, so samplers read the output the way it was trained.
    from l2p.toy.source import ToySourceConfig, build_toy_pipeline

    cfg = ToySourceConfig().scaled(image_size=32, vae_channels=(8, 16), layers=1, heads=2,
                                   head_dim=8, text_dim=16, text_layers=1)
    build_toy_pipeline(cfg).save_pretrained(tmp_path / "src", safe_serialization=True)
    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "px")]) == 0
    info = json.loads((tmp_path / "px" / "model_index.json").read_text())["_l2p"]
    assert info["prediction"] == "flow" and info["patch_size"] == 4 and info["vae_scale_factor"] == 2


def test_sana_pipeline_factor_comes_from_the_dc_ae(tmp_path):
    # A pipeline folder whose VAE config says 32x gives P = 32.
    name = "SanaTransformer2DModel"
    src = tmp_path / "src"
    getattr(diffusers, name).from_config(TINY[name]).save_pretrained(src / "transformer")
    (src / "vae").mkdir()
    (src / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderDC", "encoder_block_out_channels": [8] * 6}))
    (src / "model_index.json").write_text(json.dumps(
        {"_class_name": "SanaPipeline", "transformer": ["diffusers", name],
         "vae": ["diffusers", "AutoencoderDC"]}))
    assert cli(["convert", "--source", str(src), "--out", str(tmp_path / "px")]) == 0
    index = json.loads((tmp_path / "px" / "model_index.json").read_text())
    assert index["_l2p"]["patch_size"] == 32 and index["_l2p"]["vae_scale_factor"] == 32


def test_cli_lists_the_new_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    assert "convert" in text and "merge" in text
