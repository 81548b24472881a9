"""Source LoRAs fused into converted tiny pipelines: the update each layer gets, exact undo,
what the pixel model cannot take, and bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from l2p import L2PPipeline
from l2p.cli import main

FAMILIES = ("pixart", "sd3", "flux")  # the converted tiny pipelines of conftest.py


def _fresh(converted, name):
    pipe = L2PPipeline.from_pretrained(converted[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    return pipe("a red circle", height=16, width=16, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _first_linear(module: torch.nn.Module, under: str = "") -> str:
    return next(n for n, m in module.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith(under))


def _pair(layer: torch.nn.Linear, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, layer.in_features, generator=gen)
    b = torch.randn(layer.out_features, rank, generator=gen)
    return a, b


def _write(path, tensors: dict, config: dict | None = None):
    metadata = {"format": "pt"}
    if config is not None:
        metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_update_is_scale_alpha_over_rank_b_a_and_unfuse_is_exact(converted, tmp_path, name):
    pipe = _fresh(converted, name)
    source = pipe.transformer.transformer
    block = _first_linear(source, pipe.transformer.adapter.block_groups[0])  # a frozen middle layer
    encoder = pipe.text_pipeline.text_encoder
    text_layer = _first_linear(encoder)
    a, b = _pair(source.get_submodule(block), rank=2, seed=0)
    ta, tb = _pair(encoder.get_submodule(text_layer), rank=3, seed=1)
    lora = _write(tmp_path / "style.safetensors", {
        f"transformer.{block}.lora_A.weight": a, f"transformer.{block}.lora_B.weight": b,
        f"text_encoder.{text_layer}.lora_A.weight": ta, f"text_encoder.{text_layer}.lora_B.weight": tb,
    }, config={"transformer.r": 2, "transformer.lora_alpha": 4, "text_encoder.r": 3, "text_encoder.lora_alpha": 3})

    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    image_before = _run(pipe)

    fused = pipe.fuse_lora(lora, lora_scale=0.5)
    assert sorted(fused.fused) == sorted([f"transformer.{block}", f"text_encoder.{text_layer}"])
    assert fused.skipped == {}
    torch.testing.assert_close(source.get_submodule(block).weight,
                               before[f"transformer.{block}.weight"] + 0.5 * (4 / 2) * b @ a)
    torch.testing.assert_close(encoder.get_submodule(text_layer).weight,
                               text_before[f"{text_layer}.weight"] + 0.5 * 1.0 * tb @ ta)
    changed = {n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"transformer.{block}.weight"}
    assert (_run(pipe) - image_before).abs().max() > 1e-4

    pipe.unfuse_lora()
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())
    assert all(torch.equal(p, text_before[n]) for n, p in encoder.named_parameters())
    assert torch.equal(_run(pipe), image_before)


def test_alpha_entries_replaced_layers_and_two_loras_undo_in_order(converted, tmp_path):
    pipe = _fresh(converted, "flux")
    source = pipe.transformer.transformer
    layer = _first_linear(source, "transformer_blocks.0")
    a, b = _pair(source.get_submodule(layer), rank=4, seed=2)
    # kohya-style alpha entries kept in diffusers naming (FluxPipeline.lora_state_dict takes them
    # out as network alphas): scale = alpha / r = 0.25. x_embedder is the pixel embedding now.
    x_a, x_b = torch.randn(4, 16), torch.randn(8, 4)
    first = _write(tmp_path / "a.safetensors", {
        f"transformer.{layer}.lora_A.weight": a, f"transformer.{layer}.lora_B.weight": b,
        f"transformer.{layer}.alpha": torch.tensor(1.0),
        "transformer.x_embedder.lora_A.weight": x_a, "transformer.x_embedder.lora_B.weight": x_b,
    })
    second = _write(tmp_path / "b.safetensors", {
        f"transformer.{layer}.lora_A.weight": a, f"transformer.{layer}.lora_B.weight": -b})
    original = source.get_submodule(layer).weight.detach().clone()
    pixel_embed = {n: p.detach().clone() for n, p in pipe.transformer.pixel_embed.named_parameters()}

    fused = pipe.fuse_lora(first)
    assert fused.fused == [f"transformer.{layer}"]
    assert "replaced this layer" in fused.skipped["transformer.x_embedder"]
    assert all(torch.equal(p, pixel_embed[n]) for n, p in pipe.transformer.pixel_embed.named_parameters())
    once = original + 0.25 * b @ a
    torch.testing.assert_close(source.get_submodule(layer).weight, once)
    pipe.fuse_lora(second, lora_scale=2.0)  # no alpha: scale 1 x 2
    torch.testing.assert_close(source.get_submodule(layer).weight, once - 2.0 * b @ a)
    pipe.unfuse_lora()
    assert torch.equal(source.get_submodule(layer).weight, original) and pipe.fused_loras == []


def test_a_lora_the_pixel_model_cannot_take_is_refused_and_changes_nothing(converted, tmp_path):
    pipe = _fresh(converted, "sd3")
    source = pipe.transformer.transformer
    good = _first_linear(source, "transformer_blocks.0")
    a, b = _pair(source.get_submodule(good), rank=2, seed=3)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}

    only_replaced = _write(tmp_path / "head.safetensors", {
        "transformer.proj_out.lora_A.weight": torch.randn(2, 32), "transformer.proj_out.lora_B.weight": torch.randn(48, 2)})
    with pytest.raises(ValueError, match="none of the 1 layers .* another model family"):
        pipe.fuse_lora(only_replaced)
    wrong_shape = _write(tmp_path / "other.safetensors", {
        f"transformer.{good}.lora_A.weight": a, f"transformer.{good}.lora_B.weight": b,
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(2, 7),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(5, 2)})
    with pytest.raises(ValueError, match="made for another model"):
        pipe.fuse_lora(wrong_shape)
    half = _write(tmp_path / "half.safetensors", {f"transformer.{good}.lora_A.weight": a})
    with pytest.raises(ValueError, match="lora_B.weight missing"):
        pipe.fuse_lora(half)
    dora = _write(tmp_path / "dora.safetensors", {
        f"transformer.{good}.lora_A.weight": a, f"transformer.{good}.lora_B.weight": b,
        f"transformer.{good}.lora_magnitude_vector": torch.ones(b.shape[0])})
    with pytest.raises(ValueError, match="DoRA"):
        pipe.fuse_lora(dora)
    torch.save({}, tmp_path / "pickled.bin")
    with pytest.raises(ValueError, match="safetensors files only"):
        pipe.fuse_lora(tmp_path / "pickled.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        pipe.fuse_lora(tmp_path)
    with pytest.raises(ValueError, match="finite"):
        pipe.fuse_lora(_write(tmp_path / "ok.safetensors", {
            f"transformer.{good}.lora_A.weight": a, f"transformer.{good}.lora_B.weight": b}), lora_scale=float("nan"))
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())
    assert pipe.fused_loras == []


def test_unprefixed_keys_are_the_transformers_and_rank_patterns_apply(converted, tmp_path):
    # What ModelMixin.save_lora_adapter writes: no component prefix, the config unprefixed.
    pipe = _fresh(converted, "pixart")
    source = pipe.transformer.transformer
    q, k = "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k"
    qa, qb = _pair(source.get_submodule(q), rank=2, seed=4)
    ka, kb = _pair(source.get_submodule(k), rank=2, seed=5)
    before_q, before_k = (source.get_submodule(n).weight.detach().clone() for n in (q, k))
    lora = _write(tmp_path / "adapter.safetensors", {
        f"{q}.lora_A.weight": qa, f"{q}.lora_B.weight": qb, f"{k}.lora_A.weight": ka, f"{k}.lora_B.weight": kb,
    }, config={"r": 2, "lora_alpha": 2, "alpha_pattern": {"attn1.to_k": 8}})
    pipe.fuse_lora(lora)
    torch.testing.assert_close(source.get_submodule(q).weight, before_q + qb @ qa)
    torch.testing.assert_close(source.get_submodule(k).weight, before_k + 4.0 * kb @ ka)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("prefix", ["transformer.", ""], ids=["pipeline-names", "model-names"])
def test_a_lora_trained_on_the_pixel_model_fuses_into_its_blocks_and_head(converted, tmp_path, name, prefix):
    """PEFT on the PixelTransformer2DModel names the source's layers under its ``transformer.``
    and the Detailer Head's convs under ``head.``; a pipeline's LoRA file adds the component
    prefix "transformer.", a model's (save_lora_adapter) does not."""
    import torch.nn.functional as F

    pipe = _fresh(converted, name)
    model = pipe.transformer
    block = "transformer." + _first_linear(model.transformer, model.adapter.block_groups[0])
    conv = next(n for n, m in model.head.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    conv, layer = f"head.{conv}", model.get_submodule(f"head.{conv}")
    rank = 2
    a, b = _pair(model.get_submodule(block), rank=rank, seed=6)
    gen = torch.Generator().manual_seed(7)
    conv_a = torch.randn(rank, layer.in_channels, 3, 3, generator=gen)   # PEFT: Conv2d(in, r, 3x3)
    conv_b = torch.randn(layer.out_channels, rank, 1, 1, generator=gen)  # then Conv2d(r, out, 1x1)
    lora = _write(tmp_path / "pixel.safetensors", {
        f"{prefix}{block}.lora_A.weight": a, f"{prefix}{block}.lora_B.weight": b,
        f"{prefix}{conv}.lora_A.weight": conv_a, f"{prefix}{conv}.lora_B.weight": conv_b,
    }, config={f"{prefix}r" if prefix else "r": rank, f"{prefix}lora_alpha" if prefix else "lora_alpha": 4})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    fused = pipe.fuse_lora(lora, lora_scale=0.5)
    assert len(fused.fused) == 2 and fused.skipped == {}
    factor = 0.5 * 4 / rank
    torch.testing.assert_close(model.get_submodule(block).weight, before[f"{block}.weight"] + factor * b @ a)
    # The fused conv computes what PEFT's LoRA conv adds at run time: W x + factor * B(A(x)).
    x = torch.randn(1, layer.in_channels, 6, 5, generator=gen)
    expected = (F.conv2d(x, before[f"{conv}.weight"], before[f"{conv}.bias"], padding=1)
                + factor * F.conv2d(F.conv2d(x, conv_a, padding=1), conv_b))
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{block}.weight", f"{conv}.weight"}
    pipe.unfuse_lora()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sample_cli_fuses_loras_and_save_records_them(converted, tmp_path, capsys):
    pipe = _fresh(converted, "pixart")
    layer = "transformer_blocks.0.attn1.to_q"
    a, b = _pair(pipe.transformer.transformer.get_submodule(layer), rank=2, seed=6)
    lora = _write(tmp_path / "style.safetensors", {
        f"transformer.{layer}.lora_A.weight": a, f"transformer.{layer}.lora_B.weight": 5 * b})
    common = ["sample", "--model", str(converted["pixart"]), "--prompt", "a red circle", "--height", "16",
              "--width", "16", "--steps", "2", "--seed", "3"]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--lora", f"{lora}:0.5", "--out", str(tmp_path / "lora.png")]) == 0
    assert f"fused {lora} at scale 0.5 into 1 layers" in capsys.readouterr().out
    plain, styled = (np.asarray(Image.open(tmp_path / f)) for f in ("plain.png", "lora.png"))
    assert not np.array_equal(plain, styled)

    pipe.fuse_lora(lora, lora_scale=0.5)
    pipe.save_pretrained(tmp_path / "baked")
    record = json.loads((tmp_path / "baked" / "model_index.json").read_text())["_l2p"]
    assert record["fused_loras"] == [{"file": "style.safetensors", "scale": 0.5, "layers": 1}]
    baked = L2PPipeline.from_pretrained(tmp_path / "baked")
    baked.set_progress_bar_config(disable=True)
    assert torch.equal(_run(baked), _run(pipe))


def test_kohya_file_is_converted_by_the_source_pipeline(converted, tmp_path):
    # kohya's FLUX naming (lora_unet_single_blocks_0_linear2 = single_transformer_blocks.0.proj_out,
    # lora_down/lora_up, alpha), converted by FluxPipeline.lora_state_dict with alpha / r folded in.
    pipe = _fresh(converted, "flux")
    layer = pipe.transformer.transformer.get_submodule("single_transformer_blocks.0.proj_out")
    a, b = _pair(layer, rank=4, seed=7)
    before = layer.weight.detach().clone()
    lora = _write(tmp_path / "kohya.safetensors", {
        "lora_unet_single_blocks_0_linear2.lora_down.weight": a,
        "lora_unet_single_blocks_0_linear2.lora_up.weight": b,
        "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(2.0)})
    fused = pipe.fuse_lora(lora)
    assert fused.fused == ["transformer.single_transformer_blocks.0.proj_out"]
    torch.testing.assert_close(layer.weight, before + 0.5 * b @ a)


def test_kohya_names_for_a_family_without_a_diffusers_lora_loader_are_a_clear_error(converted, tmp_path):
    pipe = _fresh(converted, "pixart")  # PixArtSigmaPipeline has no lora_state_dict
    lora = _write(tmp_path / "kohya.safetensors", {
        "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 32),
        "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 2)})
    with pytest.raises(ValueError, match="converted only for families whose diffusers pipeline loads LoRAs"):
        pipe.fuse_lora(lora)
