"""Mistakes a user can make get errors that say what to do."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

import l2p
from l2p.cli import main as cli

from _families import TINY, call_kwargs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _model(name, **kw):
    return l2p.convert_to_pixel(getattr(diffusers, name).from_config(TINY[name]),
                                head={"type": "detailer", "channels": [4, 4, 4, 4, 4][: 5 if name.startswith("Sana") else 4]}, **kw)


def test_image_size_off_the_patch_grid():
    name = "PixArtTransformer2DModel"
    model = _model(name)
    kwargs = call_kwargs(name, 1, 32, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"not a multiple of patch_size 16; resize or pad it to 48x32"):
        model(torch.randn(1, 3, 40, 32), **kwargs)


def test_latent_shaped_input_is_refused():
    name = "SD3Transformer2DModel"
    model = _model(name)
    kwargs = call_kwargs(name, 1, 32, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 16, 4, 4), **kwargs)


@pytest.mark.parametrize("name, patch", [
    ("SD3Transformer2DModel", 24), ("SD3Transformer2DModel", 2), ("SanaTransformer2DModel", 48),
    ("FluxTransformer2DModel", 17),
])
def test_patch_size_must_be_latent_patch_times_power_of_two(name, patch):
    source = getattr(diffusers, name).from_config(TINY[name])
    with pytest.raises(ValueError, match="power of two"):
        l2p.convert_to_pixel(source, patch_size=patch)


def test_bad_vae_factor_and_head():
    source = diffusers.SD3Transformer2DModel.from_config(TINY["SD3Transformer2DModel"])
    with pytest.raises(ValueError, match="vae_scale_factor"):
        l2p.convert_to_pixel(source, vae_scale_factor=6)
    with pytest.raises(ValueError, match="head must be one of"):
        l2p.convert_to_pixel(source, head="unet")


def test_unsupported_class_names_the_supported_ones():
    unet = diffusers.UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="UNet2DModel is not supported.*FluxTransformer2DModel.*Lumina2Transformer2DModel"):
        l2p.convert_to_pixel(unet)
    with pytest.raises(ValueError, match="not supported"):
        l2p.convert_to_pixel(torch.nn.Linear(2, 2))


def test_call_arguments_for_another_grid():
    name = "FluxTransformer2DModel"
    model = _model(name)
    kwargs = call_kwargs(name, 1, 32, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="img_ids has 8 rows but the image gives a 2x2"):
        model(torch.randn(1, 3, 32, 32), **kwargs)
    name = "QwenImageTransformer2DModel"
    model = _model(name)
    kwargs = call_kwargs(name, 1, 32, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="img_shapes"):
        model(torch.randn(1, 3, 32, 32), **kwargs)
    name = "DiTTransformer2DModel"
    model = _model(name)
    kwargs = call_kwargs(name, 1, 32, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 32, 48), **kwargs)
    with pytest.raises(TypeError, match="DiTTransformer2DModel forward arguments"):
        model(torch.randn(1, 3, 32, 32), not_an_argument=1, **kwargs)


def test_set_trainable_policies():
    model = _model("SD3Transformer2DModel")
    assert l2p.set_trainable(model, "all").trainable == sum(p.numel() for p in model.parameters())
    report = l2p.set_trainable(model, ["head.*", "transformer.pos_embed.proj.*"])
    assert set(report.trainable_names) == {n for n, _ in model.named_parameters()
                                           if n.startswith(("head.", "transformer.pos_embed.proj."))}
    assert l2p.set_trainable(model, "head.fuse.*").trainable_names == ["head.fuse.weight", "head.fuse.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        l2p.set_trainable(model, "tail.*")
    with pytest.raises(ValueError, match="first_last:N"):
        l2p.set_trainable(model, "first_last:x")
    with pytest.raises(TypeError, match="PixelTransformer2DModel"):
        l2p.set_trainable(torch.nn.Linear(2, 2))
    # 2N >= number of blocks: every block trains.
    assert len(l2p.set_trainable(model, "first_last:5").trainable_blocks) == 3
    l2p.set_trainable(model, ["head.fuse.weight"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="set_trainable"):
        l2p.save_delta(model, "/nonexistent/never-written.safetensors")


def test_folders_that_are_not_diffusers_models(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["convert", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    assert cli(["convert", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    assert cli(["convert", "--source", str(odd), "--out", str(tmp_path / "o")]) == 2
    assert "supported transformers: DiTTransformer2DModel" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    assert cli(["convert", "--source", str(pickled), "--out", str(tmp_path / "o")]) == 2
    assert "never loads pickle" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_folder_must_be_new_and_delta_must_fit(tmp_path, capsys):
    name = "SD3Transformer2DModel"
    diffusers.SD3Transformer2DModel.from_config(TINY[name]).save_pretrained(tmp_path / "src")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").read_text() == "keep me"

    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "px")]) == 0
    other = l2p.convert_to_pixel(diffusers.SD3Transformer2DModel.from_config(TINY[name]), patch_size=32)
    l2p.set_trainable(other, "first_last:1")
    l2p.save_delta(other, tmp_path / "other.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "px"), "--delta", str(tmp_path / "other.safetensors"),
                "--out", str(tmp_path / "m")]) == 2
    assert "differ" in capsys.readouterr().err
    assert cli(["merge", "--base", str(tmp_path / "src"), "--delta", str(tmp_path / "other.safetensors"),
                "--out", str(tmp_path / "m")]) == 2
    assert "not a pixel model" in capsys.readouterr().err
    assert cli(["merge", "--base", str(tmp_path / "px"), "--delta", str(tmp_path / "none.safetensors"),
                "--out", str(tmp_path / "m")]) == 2


def test_text_conditioning_and_sampling_recipe_come_from_the_adapter():
    from l2p.adapters import ADAPTERS
    from l2p.sample.schedule import recipe_for
    from l2p.train.conditioning import family_for

    flux = ADAPTERS["FluxTransformer2DModel"]
    assert family_for("FluxTransformer2DModel").call is flux.transformer_kwargs
    assert recipe_for("FluxTransformer2DModel").distilled_guidance and flux.flow_sigmas
    assert all(adapter.has_conditioning() for adapter in ADAPTERS.values())
    with pytest.raises(ValueError, match="no conditioning for UNet2DConditionModel"):
        family_for("UNet2DConditionModel")
    with pytest.raises(ValueError, match="families:"):
        recipe_for("UNet2DConditionModel")


def test_api_arguments_of_the_wrong_kind_are_named(tmp_path):
    # These failed as "'NoneType' object is not iterable", "'list' object has no attribute
    # 'is_floating_point'" or "'Linear' object has no attribute 'config'"; seed=1.5 converted
    # silently as seed 1.
    model = _model("SD3Transformer2DModel")
    for policy in (None, 5):
        with pytest.raises(ValueError, match="policy must be 'all', 'first_last:N' or name patterns"):
            l2p.set_trainable(model, policy)
    for delta in (None, 123):
        with pytest.raises(TypeError, match="merge_delta takes a delta file's path"):
            l2p.merge_delta(model, delta)
    with pytest.raises(TypeError, match="delta entry head.fuse.bias is a list, not a tensor"):
        l2p.merge_delta(model, {"head.fuse.bias": [0.0] * 4})
    with pytest.raises(TypeError, match="save_delta takes a PixelTransformer2DModel"):
        l2p.save_delta(torch.nn.Linear(2, 2), tmp_path / "delta.safetensors")
    with pytest.raises(TypeError, match="merge_delta takes a PixelTransformer2DModel"):
        l2p.merge_delta(torch.nn.Linear(2, 2), {})
    assert not (tmp_path / "delta.safetensors").exists()
    source = diffusers.SD3Transformer2DModel.from_config(TINY["SD3Transformer2DModel"])
    for seed in (1.5, "x", True):
        with pytest.raises(ValueError, match="seed must be an int"):
            l2p.convert_to_pixel(source, seed=seed)


@pytest.mark.parametrize("name", ["ZImageTransformer2DModel", "Lumina2Transformer2DModel"])
def test_sizes_beyond_the_rotary_table_are_refused_in_pixels(name):
    # axes_lens 32 rows and 32 columns in the tiny configs: 512 px a side at patch 16. One token
    # more indexed past the table: "index 32 is out of bounds for dimension 0 with size 32" on
    # the CPU (out-of-range indexing on CUDA is a device-side assert instead; not run here).
    model = _model(name).eval()
    with torch.no_grad():
        for h, w in [(16, 512), (512, 16)]:
            kwargs = call_kwargs(name, 1, h, w, torch.Generator().manual_seed(0))
            assert model(torch.randn(1, 3, h, w), **kwargs).sample.shape == (1, 3, h, w)
        for h, w in [(16, 528), (528, 16)]:
            kwargs = call_kwargs(name, 1, h, w, torch.Generator().manual_seed(0))
            with pytest.raises(ValueError, match=rf"{h}x{w} px is beyond this {name}'s rotary position table: "
                                                 r"at most 512 px high and 512 px wide at pixel patch 16"):
                model(torch.randn(1, 3, h, w), **kwargs)
