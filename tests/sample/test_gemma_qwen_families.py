"""L2PPipeline end to end from converted tiny Sana, Lumina2 and Z-Image pipelines (Gemma2 and
Qwen3 text encoders; l2p.testing builds them with random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _checks import (assert_attention_modes_agree, assert_batch_is_each_prompt_alone, assert_block_offload_agrees,
                     converted_pipelines)
from l2p import testing

# name -> (builder, pixel patch of its tiny VAE x latent patch, image side)
FAMILIES = {
    "sana": (testing.build_tiny_sana_pipeline, 4, 32),  # DC-AE factor 4, patch 1
    "lumina2": (testing.build_tiny_lumina2_pipeline, 16, 64),  # factor 8, patch 2
    "z_image": (testing.build_tiny_z_image_pipeline, 4, 32),  # factor 2, patch 2
}
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for name, (build, _, _) in FAMILIES.items():
        build(root / name)
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(sources, tmp_path_factory):
    out = converted_pipelines(sources, tmp_path_factory.mktemp("converted"))
    for name, (_, patch, _) in FAMILIES.items():
        assert out[name].transformer.config.patch_size == patch
    return out


def _run(pipe, name, seed=0, **kwargs):
    side = FAMILIES[name][2]
    kwargs = {"height": side, "width": side, "num_inference_steps": 2, "guidance_scale": 3.0,
              "output_type": "pt", **kwargs}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _batch_sizes(pipe):
    """A hook recording the batch of each transformer call, and the list it fills."""
    seen = []

    def record(module, args, kwargs):
        x = kwargs.get("hidden_states", kwargs.get("x"))
        seen.append(len(x))

    return pipe.transformer.register_forward_pre_hook(record, with_kwargs=True), seen


@pytest.mark.parametrize("name", FAMILIES)
def test_two_images_with_guidance_and_seed(pipelines, name):
    pipe, side = pipelines[name], FAMILIES[name][2]
    hook, batches = _batch_sizes(pipe)
    try:
        a = _run(pipe, name)
    finally:
        hook.remove()
    assert batches == [4, 4]  # uncond and cond of both images in one call per step
    assert a.shape == (2, 3, side, side) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(_run(pipe, name), a, rtol=0, atol=0)
    assert (_run(pipe, name, seed=1) - a).abs().max() > 1e-3
    assert (a[0] - a[1]).abs().max() > 1e-4  # the two prompts differ
    pil = _run(pipe, name, output_type="pil", num_inference_steps=1)
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (side, side)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_of_prompts_is_each_prompt_alone(pipelines, name):
    side = FAMILIES[name][2]
    assert_batch_is_each_prompt_alone(pipelines[name], ["a red circle", "two small blue squares on green"],
                                      ["blurry", ""], height=side, width=side // 2, guidance_scale=3.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_modes_give_the_same_image(pipelines, name, monkeypatch):
    assert_attention_modes_agree(pipelines[name], lambda pipe: _run(pipe, name), monkeypatch)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_offload_gives_the_same_images(pipelines, name):
    assert_block_offload_agrees(pipelines[name], lambda pipe: _run(pipe, name))


@pytest.mark.parametrize("name", FAMILIES)
def test_timesteps_match_the_source_pipeline(sources, pipelines, name):
    from diffusers import DiffusionPipeline

    source = DiffusionPipeline.from_pretrained(str(sources[name]))
    source.set_progress_bar_config(disable=True)
    side = FAMILIES[name][2]
    extra = {"use_resolution_binning": False} if name == "sana" else {}
    source("x", height=side, width=side, num_inference_steps=3, output_type="latent", **extra)
    _run(pipelines[name], name, num_inference_steps=3)
    torch.testing.assert_close(pipelines[name].scheduler.timesteps, source.scheduler.timesteps)
    torch.testing.assert_close(pipelines[name].scheduler.sigmas, source.scheduler.sigmas)


def test_sana_conditioning_is_what_its_pipeline_feeds_the_transformer(sources, pipelines):
    """SanaPipeline.__call__ prepends its complex human instruction to prompts, not to
    negative prompts, and keeps the first and the last max_sequence_length - 1 tokens."""
    from diffusers import DiffusionPipeline

    source = DiffusionPipeline.from_pretrained(str(sources["sana"]))
    source.set_progress_bar_config(disable=True)
    seen = []
    hook = source.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"], kw["encoder_attention_mask"])),
        with_kwargs=True)
    try:
        source("a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=1,
               guidance_scale=3.0, output_type="latent", use_resolution_binning=False)
    finally:
        hook.remove()
    embeds, mask = seen[0]  # [negative, positive]
    cond, uncond = pipelines["sana"].encode_prompt(["a red circle"], "blurry")
    for ours, theirs in [(uncond["prompt_embeds"], embeds[:1]), (cond["prompt_embeds"], embeds[1:]),
                         (uncond["prompt_attention_mask"], mask[:1]), (cond["prompt_attention_mask"], mask[1:])]:
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-5)
    plain = source.encode_prompt("a red circle", False, complex_human_instruction=None)[0]
    assert plain.shape != cond["prompt_embeds"].shape or (plain - cond["prompt_embeds"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["lumina2", "z_image"])
def test_conditioning_is_the_sources(sources, pipelines, name):
    """Prompt and negative prompt encoded as the source pipeline encodes them for CFG
    (Lumina2 prepends its system prompt to the prompt only)."""
    from diffusers import DiffusionPipeline

    source = DiffusionPipeline.from_pretrained(str(sources[name]))
    cond, uncond = pipelines[name].encode_prompt(["a red circle"], "blurry")
    if name == "z_image":
        pe, npe = source.encode_prompt(["a red circle"], do_classifier_free_guidance=True, negative_prompt=["blurry"])
        pairs = [(cond["prompt_embeds"][0], pe[0]), (uncond["prompt_embeds"][0], npe[0])]
    else:
        pe, pm, npe, npm = source.encode_prompt("a red circle", True, negative_prompt="blurry")
        pairs = [(cond["prompt_embeds"], pe), (cond["prompt_attention_mask"], pm),
                 (uncond["prompt_embeds"], npe), (uncond["prompt_attention_mask"], npm)]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_z_image_guidance_is_its_pipelines(pipelines):
    """ZImagePipeline guides as cond + g (cond - uncond), on for any g > 0."""
    pipe = pipelines["z_image"]
    hook, batches = _batch_sizes(pipe)
    try:
        _run(pipe, "z_image", guidance_scale=0.0, num_inference_steps=1)
        assert batches == [2]
        outputs = []
        out_hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
        noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        try:
            image = _run(pipe, "z_image", guidance_scale=0.5, num_inference_steps=1, latents=noise)
        finally:
            out_hook.remove()
    finally:
        hook.remove()
    assert batches == [2, 4]
    neg, pos = outputs[0].chunk(2)
    # One Euler step from sigma 1 to 0 of the negated output: x0 = noise + guided output.
    expected = ((noise + pos + 0.5 * (pos - neg)).clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(image, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(image.numpy()).all()


def _guided_one_step(pipe, name, **options):
    """One Euler step from sigma 1 to 0 with given noise: (the image, the transformer's
    uncond and cond outputs of that step)."""
    side = FAMILIES[name][2]
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    noise = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    try:
        image = _run(pipe, name, num_inference_steps=1, latents=noise, **options)
    finally:
        hook.remove()
    uncond, cond = outputs[0].chunk(2)
    return image, noise, uncond, cond


def _as_image(x0):
    return (x0.clamp(-1, 1) / 2 + 0.5).clamp(0, 1)


def test_lumina2_guidance_is_its_pipelines(pipelines):
    """Lumina2Pipeline: uncond + w (cond - uncond), rescaled by default to the conditional's
    norm along the last axis; cfg_trunc_ratio ends guidance after that fraction of the steps."""
    pipe = pipelines["lumina2"]
    image, noise, uncond, cond = _guided_one_step(pipe, "lumina2")
    guided = uncond + 3.0 * (cond - uncond)
    normalized = guided * cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
    # The model returns the negated velocity: x0 = noise + output after one step from 1 to 0.
    torch.testing.assert_close(image, _as_image(noise + normalized), rtol=1e-5, atol=1e-5)
    plain, noise, uncond, cond = _guided_one_step(pipe, "lumina2", cfg_normalization=False)
    torch.testing.assert_close(plain, _as_image(noise + uncond + 3.0 * (cond - uncond)), rtol=1e-5, atol=1e-5)
    assert (plain - image).abs().max() > 1e-4

    hook, batches = _batch_sizes(pipe)
    try:
        _run(pipe, "lumina2", num_inference_steps=4, cfg_trunc_ratio=0.5)
    finally:
        hook.remove()
    assert batches == [4, 4, 2, 2]  # (i + 1) / 4 <= 0.5 for the first two steps only


def test_z_image_truncation_and_normalization_are_its_pipelines(pipelines):
    pipe = pipelines["z_image"]
    image, noise, uncond, cond = _guided_one_step(pipe, "z_image", cfg_normalization=1.0)
    guided = cond + 3.0 * (cond - uncond)
    limit = cond.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    current = guided.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert (current > limit).all()  # the cap binds here
    torch.testing.assert_close(image, _as_image(noise + guided * limit / current), rtol=1e-5, atol=1e-5)

    source_timesteps = []
    hook, batches = _batch_sizes(pipe)
    try:
        _run(pipe, "z_image", num_inference_steps=4, cfg_truncation=0.2,
             callback_on_step_end=lambda p, i, t, kw: source_timesteps.append(float(t)))
    finally:
        hook.remove()
    # ZImagePipeline: guided while (1000 - t) / 1000 <= cfg_truncation.
    assert batches == [4 if (1000 - t) / 1000 <= 0.2 else 2 for t in source_timesteps]
    assert 4 in batches and 2 in batches


def test_unknown_guidance_options_are_refused_by_name(pipelines):
    with pytest.raises(TypeError, match="cfg_trunc_ratio \\(default 1.0\\), cfg_normalization"):
        _run(pipelines["lumina2"], "lumina2", cfg_truncation=0.5)
    with pytest.raises(TypeError, match="guidance options: none"):
        _run(pipelines["sana"], "sana", cfg_normalization=True)


def _assert_same_conditioning(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], theirs[name]
        for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
            torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_encodes_the_empty_caption_as_the_samplers_negative_prompt(sources, pipelines, name, tmp_path):
    """Caption dropout trains the unconditional branch on what guidance feeds it when sampling:
    Lumina2's system prompt and Sana's instruction go with prompts, not with the empty caption."""
    import csv

    from l2p.data.embed import EmbeddingCache, build_embedding_cache
    from l2p.train import conditioning

    pipe = pipelines[name]
    cond, uncond = pipe.encode_prompt(["a red circle"], "")
    text = conditioning.TextEncoder(pipe.text_pipeline, pipe.transformer.config.source_class, torch.device("cpu"))
    _assert_same_conditioning(text(["a red circle"]), cond)
    _assert_same_conditioning(text([""]), uncond)
    _assert_same_conditioning(text(["a red circle", ""]), conditioning.stack([cond, uncond]))

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "0.png")
    with open(data / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text"], ["0.png", "a red circle"]])
    build_embedding_cache(sources[name], data, out=tmp_path / "cache", device="cpu", progress=False)
    cache = EmbeddingCache(tmp_path / "cache")
    _assert_same_conditioning(cache([""]), uncond)
    _assert_same_conditioning(cache(["a red circle"]), cond)


@pytest.mark.parametrize("name", FAMILIES)
def test_precomputed_embeddings_give_the_prompts_images(pipelines, name):
    """Sana and Lumina2 take prompt_embeds + prompt_attention_mask, Z-Image a list of (L, D)
    prompt_embeds, as their pipelines do; the images are the prompts'."""
    pipe, side = pipelines[name], FAMILIES[name][2]
    cond, uncond = pipe.encode_prompt(PROMPTS, ["blurry", ""])
    assert sorted(cond) == sorted(pipe.transformer.adapter.embedding_arguments)
    kwargs = {"height": side, "width": side, "num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "pt"}
    from_text = pipe(PROMPTS, ["blurry", ""], generator=torch.Generator().manual_seed(0), **kwargs).images
    given = pipe(**cond, **{f"negative_{k}": v for k, v in uncond.items()},
                 generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(given, from_text, rtol=0, atol=1e-6)
