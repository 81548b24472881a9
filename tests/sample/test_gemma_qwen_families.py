"""L2PPipeline end to end from converted tiny Sana, Lumina2 and Z-Image pipelines (Gemma2 and
Qwen3 text encoders; l2p.testing builds them with random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _checks import assert_attention_modes_agree, converted_pipelines
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
def test_attention_modes_give_the_same_image(pipelines, name, monkeypatch):
    assert_attention_modes_agree(pipelines[name], lambda pipe: _run(pipe, name), monkeypatch)


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


@pytest.mark.parametrize("name", FAMILIES)
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
