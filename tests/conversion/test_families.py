"""Every supported family, tiny and random: conversion, forward/backward on pixels,
freezing, save/load and delta + merge round trips."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

import l2p
from l2p.cli import main as cli

from _families import FAMILIES, PATCH, TINY, call_kwargs, image_size

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def small_head(name: str) -> dict:
    levels = PATCH[name].bit_length() - 1
    return {"type": "detailer", "channels": [4, 8, 8, 16, 16][:levels]}


def make(name: str, seed: int = 0):
    torch.manual_seed(123)
    source = getattr(diffusers, name).from_config(TINY[name]).eval()
    return source, l2p.convert_to_pixel(source, head=small_head(name), seed=seed)


def inputs(name: str, batch: int = 2, seed: int = 1, square: bool = False):
    g = torch.Generator().manual_seed(seed)
    h, w = image_size(name, square)
    return torch.randn(batch, 3, h, w, generator=g), call_kwargs(name, batch, h, w, g)


def test_every_family_has_a_tiny_config():
    from l2p.adapters import ADAPTERS

    assert set(FAMILIES) == set(ADAPTERS)


@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_copies_every_matching_tensor(name):
    source, model = make(name)
    report = model.conversion_report
    adapter = model.adapter
    assert report.verified
    out_proj = source.get_submodule(adapter.output_module)
    expected_dropped = {f"{adapter.input_module}.weight", f"{adapter.output_module}.weight"}
    if out_proj.bias is not None:
        expected_dropped.add(f"{adapter.output_module}.bias")
    assert set(report.dropped) == expected_dropped
    params = dict(model.named_parameters())
    for src_name, tensor in source.named_parameters():
        if src_name not in expected_dropped:
            assert torch.equal(params[f"transformer.{src_name}"], tensor), src_name
    p = PATCH[name]
    assert model.pixel_embed.weight.shape[1:] == (3, p, p)
    assert {n for n in report.initialised if not n.startswith("head.")} == {
        f"transformer.{adapter.input_module}.weight"
    }
    # The source model is left as it was.
    assert type(source.get_submodule(adapter.input_module)).__name__ in ("Linear", "Conv2d")


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_backward_and_frozen_middle(name):
    _, model = make(name)
    report = l2p.set_trainable(model, "first_last:1")
    blocks = [n for n, _ in model.blocks()]
    assert report.trainable_blocks == [blocks[0], blocks[-1]]
    x, kwargs = inputs(name)
    out = model(x, **kwargs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and set(frozen) == set(report.frozen_names)
    assert any(n.startswith(blocks[1] + ".") for n in frozen)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert model.pixel_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    opt.step()
    params = dict(model.named_parameters())
    for n, value in frozen.items():
        assert torch.equal(params[n], value), n
    assert not torch.equal(params["transformer." + model.adapter.input_module + ".weight"],
                           before["transformer." + model.adapter.input_module + ".weight"])


@pytest.mark.parametrize("name", FAMILIES)
def test_runs_the_source_forward_unchanged(name):
    """The features handed to the head are what the untouched source computes when its
    input projection yields the pixel tokens."""
    source, model = make(name)
    adapter = model.adapter
    x, kwargs = inputs(name)
    p = PATCH[name]
    rows, cols = x.shape[2] // p, x.shape[3] // p
    tokens = model.pixel_embed.embed(x)
    seen = {}
    source.get_submodule(adapter.input_module).register_forward_hook(
        lambda m, inp, out: adapter.arrange_tokens(tokens, rows, cols, inp[0]))
    source.get_submodule(adapter.output_module).register_forward_pre_hook(
        lambda m, inp: seen.update(features=inp[0]))
    model.head.register_forward_pre_hook(lambda m, inp: seen.update(head_tokens=inp[1]))
    with torch.no_grad():
        out = model(x, **kwargs).sample
        source(adapter.dummy_latent(x.shape[0], rows, cols, x.dtype, x.device), **kwargs)
    expected = adapter.image_tokens(seen["features"], rows * cols, kwargs)
    torch.testing.assert_close(seen["head_tokens"], expected, rtol=1e-5, atol=1e-6)
    # The output is the head's, with the sign the source pipeline expects.
    head_out = model.head(x, seen["head_tokens"])
    assert torch.equal(out, head_out * model.output_sign)
    assert model.output_sign == (-1 if name in ("ZImageTransformer2DModel", "Lumina2Transformer2DModel") else 1)
    assert model.prediction == ("epsilon" if name in ("DiTTransformer2DModel", "PixArtTransformer2DModel") else "flow")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("factor", [2, 4])
def test_larger_patches_feed_the_source_its_own_grid(name, factor):
    """Converted at 2x and 4x the family's patch, at the smallest image (one token) and a
    non-square one: the head reads what the untouched source computes for that token grid
    (its position table, RoPE ids, img_ids / img_shapes and padding for that grid)."""
    torch.manual_seed(123)
    source = getattr(diffusers, name).from_config(TINY[name]).eval()
    p = PATCH[name] * factor
    model = l2p.convert_to_pixel(source, patch_size=p,
                                 head={"type": "detailer", "channels": [4] * (p.bit_length() - 1)}).eval()
    adapter = model.adapter
    for rows, cols in [(1, 1), (3, 3) if name.startswith("DiT") else (1, 3)]:
        g = torch.Generator().manual_seed(rows + cols)
        x = torch.randn(2, 3, rows * p, cols * p, generator=g)
        kwargs = call_kwargs(name, 2, rows * p, cols * p, g, patch=p)
        tokens = model.pixel_embed.embed(x)
        seen = {}
        handles = [
            source.get_submodule(adapter.input_module).register_forward_hook(
                lambda m, inp, out: adapter.arrange_tokens(tokens, rows, cols, inp[0])),
            source.get_submodule(adapter.output_module).register_forward_pre_hook(
                lambda m, inp: seen.update(features=inp[0])),
            model.head.register_forward_pre_hook(lambda m, inp: seen.update(head_tokens=inp[1])),
        ]
        try:
            with torch.no_grad():
                out = model(x, **kwargs).sample
                source(adapter.dummy_latent(2, rows, cols, x.dtype, x.device), **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        assert out.shape == x.shape and torch.isfinite(out).all()
        expected = adapter.image_tokens(seen["features"], rows * cols, kwargs)
        torch.testing.assert_close(seen["head_tokens"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_load_round_trip(name, tmp_path):
    source, model = make(name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["source_class"] == name and config["patch_size"] == PATCH[name]
    assert config["head_config"] == small_head(name)
    expected = json.loads(json.dumps({k: v for k, v in source.config.items() if not k.startswith("_")}))
    assert config["source_config"] == expected
    loaded = l2p.PixelTransformer2DModel.from_pretrained(tmp_path).eval()
    x, kwargs = inputs(name)
    with torch.no_grad():
        assert torch.equal(model(x, **kwargs).sample, loaded(x, **kwargs).sample)


@pytest.mark.parametrize("name", FAMILIES)
def test_delta_and_merge_round_trip(name, tmp_path):
    _, model = make(name)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    l2p.set_trainable(model, "first_last:1")
    x, kwargs = inputs(name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, **kwargs).sample.square().mean().backward()
    opt.step()
    written = l2p.save_delta(model, tmp_path / "delta.safetensors")
    assert written == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert cli(["merge", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta.safetensors"),
                "--out", str(tmp_path / "merged")]) == 0
    merged = l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "merged")
    trained = model.state_dict()
    merged_state = merged.state_dict()
    assert set(merged_state) == set(trained)
    for key, value in trained.items():
        assert torch.equal(merged_state[key], value), key
    # In memory too.
    base = l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "base")
    l2p.merge_delta(base, tmp_path / "delta.safetensors")
    for key, value in base.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_conversion_is_deterministic_and_leaves_the_global_rng_alone():
    name = "FluxTransformer2DModel"
    _, a = make(name, seed=0)
    _, b = make(name, seed=0)
    _, c = make(name, seed=1)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    assert not torch.equal(a.pixel_embed.weight, c.pixel_embed.weight)
    assert not torch.equal(a.head.proj_out.weight, c.head.proj_out.weight)
    source = getattr(diffusers, name).from_config(TINY[name])
    before = torch.get_rng_state()
    l2p.convert_to_pixel(source, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_larger_patch_keeps_a_smaller_grid():
    name = "SD3Transformer2DModel"
    source = getattr(diffusers, name).from_config(TINY[name])
    model = l2p.convert_to_pixel(source, patch_size=64)
    assert model.config.patch_size == 64
    assert model.config.head_config["channels"] == [16, 32, 64, 128, 256, 512]
    g = torch.Generator().manual_seed(0)
    kwargs = call_kwargs(name, 1, 128, 128, g)
    out = model(torch.randn(1, 3, 128, 128), **kwargs).sample
    assert out.shape == (1, 3, 128, 128)
    assert l2p.convert_to_pixel(source, vae_scale_factor=16).config.patch_size == 32


def test_linear_head_and_gradient_checkpointing():
    name = "FluxTransformer2DModel"
    source = getattr(diffusers, name).from_config(TINY[name])
    model = l2p.convert_to_pixel(source, head="linear")
    assert isinstance(model.head, l2p.LinearHead)
    model.enable_gradient_checkpointing()
    model.train()
    x, kwargs = inputs(name)
    model(x, **kwargs).sample.mean().backward()
    assert model.transformer.transformer_blocks[0].attn.to_q.weight.grad is not None


def test_z_image_accepts_its_list_form():
    name = "ZImageTransformer2DModel"
    _, model = make(name)
    x, kwargs = inputs(name)
    with torch.no_grad():
        batched = model(x, **kwargs).sample
        listed = model([xi.unsqueeze(1) for xi in x], return_dict=False, **kwargs)[0]
    assert torch.equal(batched, listed)
    # One size per call (the source's list takes a mix): a clear error, not torch.stack's.
    mixed = [x[0], x[1][:, :, : x.shape[3] // 2]] if len(x) > 1 else [x[0], x[0][:, :, :-4]]
    with pytest.raises(ValueError, match="images of one size per call"):
        model(mixed, **kwargs)
    with pytest.raises(ValueError, match="list of"):
        model([x[0].numpy()], **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_blocks_run_every_family_close_to_full_precision(name):
    """Weight-only int8 (the sampler's quantize_int8) on each family's blocks: the source
    forward runs with Int8Linear layers in place of its Linear ones, and its output stays
    close to the full-precision model's, in float32 and bfloat16."""
    from l2p.models.quantize import Int8Linear, quantize_blocks_int8

    _, model = make(name)
    x, kwargs = inputs(name)
    with torch.no_grad():
        reference = model(x, **kwargs).sample
        report = quantize_blocks_int8(model)
        assert report.layers == sum(isinstance(m, Int8Linear) for m in model.modules()) > 0
        out = model(x, **kwargs).sample
        # Random tiny weights: int8 rows move the output by well under 1% of its spread.
        assert (out - reference).abs().max() < 0.01 * reference.std()
        model.to(torch.bfloat16)
        half = model(x.bfloat16(), **{k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                                      for k, v in kwargs.items()}).sample
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - reference).abs().mean() < 0.05 * reference.std()
