"""L2PPipeline end to end from converted tiny DiT (class-conditional) and Qwen-Image (Qwen2.5-VL
text encoder) pipelines; l2p.testing builds them with random weights."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from _checks import (assert_attention_modes_agree, assert_batch_is_each_prompt_alone, assert_block_offload_agrees,
                     converted_pipelines)
from l2p import testing
from l2p.train.conditioning import stack

SIDE = 32  # both tiny VAEs have factor 2 and latent patch 2: pixel patch 4, an 8x8 token grid
FAMILIES = {"dit": testing.build_tiny_dit_pipeline, "qwen_image": testing.build_tiny_qwen_image_pipeline}
PROMPTS = {"dit": ["goldfish", "207"], "qwen_image": ["a red circle", "two blue squares"]}
# DiT guides with guidance_scale; Qwen-Image with true_cfg_scale (guidance_scale would feed a
# guidance embedding, which the tiny model has not).
GUIDANCE = {"dit": {"guidance_scale": 4.0}, "qwen_image": {"true_cfg_scale": 4.0}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for name, build in FAMILIES.items():
        build(root / name)
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(sources, tmp_path_factory):
    out = converted_pipelines(sources, tmp_path_factory.mktemp("converted"))
    assert all(pipe.transformer.config.patch_size == 4 for pipe in out.values())
    return out


def _source(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, name, seed=0, **kwargs):
    kwargs = {"height": SIDE, "width": SIDE, "num_inference_steps": 2, "output_type": "pt", **GUIDANCE[name],
              **kwargs}
    return pipe(PROMPTS[name], generator=torch.Generator().manual_seed(seed), **kwargs).images


def _record_calls(pipe):
    """A hook recording the keyword arguments of each transformer call, and the list it fills."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    return hook, seen


@pytest.mark.parametrize("name", FAMILIES)
def test_two_images_with_guidance_and_seed(pipelines, name):
    pipe = pipelines[name]
    hook, calls = _record_calls(pipe)
    try:
        a = _run(pipe, name)
    finally:
        hook.remove()
    assert [len(c["hidden_states"]) for c in calls] == [4, 4]  # uncond and cond of both images
    assert a.shape == (2, 3, SIDE, SIDE) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(_run(pipe, name), a, rtol=0, atol=0)
    assert (_run(pipe, name, seed=1) - a).abs().max() > 1e-3
    assert (a[0] - a[1]).abs().max() > 1e-4  # the two prompts differ
    # (Qwen-Image's shift_terminal needs 2 steps or more, in QwenImagePipeline as here.)
    pil = _run(pipe, name, output_type="pil")
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (SIDE, SIDE)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_of_prompts_is_each_prompt_alone(pipelines, name):
    # DiT: two classes against a class and the null class; its images are square.
    prompts, negatives = (["1", "207"], ["3", ""]) if name == "dit" else (
        ["a red circle", "two small blue squares on green"], ["blurry", ""])
    assert_batch_is_each_prompt_alone(pipelines[name], prompts, negatives, height=SIDE,
                                      width=SIDE if name == "dit" else SIDE // 2, **GUIDANCE[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_modes_give_the_same_image(pipelines, name, monkeypatch):
    assert_attention_modes_agree(pipelines[name], lambda pipe: _run(pipe, name), monkeypatch)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_offload_gives_the_same_images(pipelines, name):
    assert_block_offload_agrees(pipelines[name], lambda pipe: _run(pipe, name))


@pytest.mark.parametrize("name", FAMILIES)
def test_timesteps_match_the_source_pipeline(sources, pipelines, name):
    source = _source(sources[name])
    if name == "dit":
        source(class_labels=[1], num_inference_steps=3, output_type="pt")
    else:  # the tiny latent grid is 8x8 too, so the dynamic shift's mu is the same
        source("x", height=SIDE, width=SIDE, num_inference_steps=3, output_type="latent")
    _run(pipelines[name], name, num_inference_steps=3)
    torch.testing.assert_close(pipelines[name].scheduler.timesteps, source.scheduler.timesteps)
    if name == "qwen_image":
        torch.testing.assert_close(pipelines[name].scheduler.sigmas, source.scheduler.sigmas)


def test_dit_classes_are_the_sources(sources, pipelines):
    """Names as DiTPipeline.get_label_ids maps them, ids as digits, and DiTPipeline's null
    class (1000) for the unconditional half, as the transformer receives them."""
    source, pipe = _source(sources["dit"]), pipelines["dit"]
    names = ["goldfish", "Tinca tinca", "golden retriever"]
    cond, uncond = pipe.encode_prompt([*names, "207", "5"])
    kwargs = pipe.family.call(stack([uncond, cond]), torch.zeros(10, 3, SIDE, SIDE),
                              torch.full((10,), 999), pipe.transformer, 1.0)
    assert kwargs["class_labels"].tolist() == [1000] * 5 + source.get_label_ids(names) + [207, 5]
    with pytest.raises(ValueError, match=r"'goldfishes' is not a class.*'Carassius auratus'.*\"207\""):
        pipe.encode_prompt("goldfishes")
    with pytest.raises(ValueError, match=r"outside 0\.\.999"):
        pipe("1000", height=SIDE, width=SIDE, num_inference_steps=1, guidance_scale=1.0)
    hook, calls = _record_calls(pipe)
    try:
        _run(pipe, "dit", num_inference_steps=1)
    finally:
        hook.remove()
    assert calls[0]["class_labels"].tolist() == [1000, 1000, 1, 207]
    assert calls[0]["timestep"].dtype == torch.long



def test_dit_class_names_survive_save_pretrained(pipelines, tmp_path):
    """The folder's id2label (which DiTPipeline reads but does not write back) is saved with
    the pipeline, so class names still work after the round trip, with the same images."""
    from l2p import L2PPipeline

    pipe = pipelines["dit"]
    pipe.save_pretrained(tmp_path / "saved")
    again = L2PPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    assert again.text_pipeline.labels == pipe.text_pipeline.labels and "goldfish" in again.text_pipeline.labels
    assert torch.equal(_run(again, "dit"), _run(pipe, "dit"))

def test_qwen_image_conditioning_is_the_sources(sources, pipelines):
    """encode_prompt's embeddings without their padding; a call pads them back with the mask
    QwenImagePipeline passes (None where no caption is padded)."""
    source, pipe = _source(sources["qwen_image"]), pipelines["qwen_image"]
    prompts = ["a red circle", "two blue squares"]
    cond, uncond = pipe.encode_prompt(prompts, "blurry")
    embeds, mask = source.encode_prompt(prompts, device="cpu")
    assert mask is not None and mask.shape[0] == 2
    x = torch.zeros(2, 3, SIDE, SIDE)
    kwargs = pipe.family.call(cond, x, torch.full((2,), 500.0), pipe.transformer, 1.0)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds, rtol=1e-5, atol=1e-5)
    assert torch.equal(kwargs["encoder_hidden_states_mask"], mask)
    assert kwargs["img_shapes"] == [[(1, 8, 8)]] * 2 and torch.equal(kwargs["timestep"], torch.full((2,), 0.5))
    negative, negative_mask = source.encode_prompt(["blurry"], device="cpu")
    assert negative_mask is None  # one caption: nothing padded
    kwargs = pipe.family.call(uncond, x, torch.full((2,), 500.0), pipe.transformer, 1.0)  # "blurry" twice
    torch.testing.assert_close(kwargs["encoder_hidden_states"], negative.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    assert kwargs["encoder_hidden_states_mask"] is None


def test_qwen_image_true_cfg_rescales_each_patch_to_the_conditional_norm(pipelines):
    """QwenImagePipeline: neg + w (cond - neg), rescaled per token to the conditional's norm
    (here per 4x4x3 pixel patch); on only for true_cfg_scale > 1."""
    pipe = pipelines["qwen_image"]
    hook, calls = _record_calls(pipe)
    try:
        _run(pipe, "qwen_image", true_cfg_scale=1.0)
        assert [len(c["hidden_states"]) for c in calls] == [2, 2]
    finally:
        hook.remove()
    outputs = []
    out_hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    noise = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    try:
        image = _run(pipe, "qwen_image", true_cfg_scale=3.0, latents=noise)
    finally:
        out_hook.remove()
    unfold = torch.nn.Unfold(kernel_size=4, stride=4)  # (B, 3*4*4, patches)
    fold = torch.nn.Fold(output_size=(SIDE, SIDE), kernel_size=4, stride=4)
    x, sigmas = noise, pipe.scheduler.sigmas
    for i, out in enumerate(outputs):  # Euler steps of the guided, rescaled velocity
        neg, pos = out.chunk(2)
        guided = unfold(neg + 3.0 * (pos - neg))
        guided = guided * unfold(pos).norm(dim=1, keepdim=True) / guided.norm(dim=1, keepdim=True)
        x = x + (sigmas[i + 1] - sigmas[i]) * fold(guided)
    torch.testing.assert_close(image, x.clamp(-1, 1) / 2 + 0.5, rtol=1e-5, atol=1e-5)


def test_qwen_image_one_step_is_refused_by_its_shift_terminal(pipelines):
    # One sigma stretched to end at shift_terminal is 0/0: the step failed with "index 0 is out of
    # bounds for dimension 0 with size 0" after a transformer call at a NaN timestep.
    with pytest.raises(ValueError, match=r"shift_terminal=0.02 needs num_inference_steps >= 2, got 1"):
        _run(pipelines["qwen_image"], "qwen_image", num_inference_steps=1)


def test_qwen_image_guides_by_default_only_with_a_negative_prompt(pipelines):
    """QwenImagePipeline's true_cfg_scale defaults to 4.0 but guides only when a negative prompt
    is given; left out here it does the same, and DiT takes its pipeline's 50 steps at 4.0."""
    pipe = pipelines["qwen_image"]
    for negative, batch in ((None, 1), ("blurry", 2)):
        hook, calls = _record_calls(pipe)
        try:
            pipe("a red circle", negative_prompt=negative, height=SIDE, width=SIDE, num_inference_steps=2,
                 output_type="pt", generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        assert [len(c["hidden_states"]) for c in calls] == [batch, batch]
    guided = pipe("a red circle", negative_prompt="blurry", height=SIDE, width=SIDE, num_inference_steps=2,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    explicit = pipe("a red circle", negative_prompt="blurry", height=SIDE, width=SIDE, num_inference_steps=2,
                    true_cfg_scale=4.0, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(guided, explicit)

    dit = pipelines["dit"]
    hook, calls = _record_calls(dit)
    try:
        left_out = dit("207", height=SIDE, width=SIDE, output_type="pt", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 50
    explicit = dit("207", height=SIDE, width=SIDE, output_type="pt", num_inference_steps=50, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(left_out.images, explicit.images)


def test_precomputed_embeddings_qwen_image_takes_its_padded_batch_and_dit_none(pipelines):
    """Qwen-Image: prompt_embeds (B, L, D) padded with prompt_embeds_mask, as QwenImagePipeline
    encode_prompt returns them; DiT has no text conditioning to give."""
    pipe = pipelines["qwen_image"]
    prompts, negatives = PROMPTS["qwen_image"], ["blurry", "a much longer negative prompt than the other"]
    embeds, mask = pipe.text_pipeline.encode_prompt(prompts, device="cpu")
    negative_embeds, negative_mask = pipe.text_pipeline.encode_prompt(negatives, device="cpu")
    assert mask is not None  # captions of different lengths: padded
    kwargs = {"height": SIDE, "width": SIDE, "num_inference_steps": 2, "true_cfg_scale": 4.0, "output_type": "pt"}
    from_text = pipe(prompts, negatives, generator=torch.Generator().manual_seed(0), **kwargs).images
    given = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative_embeds,
                 negative_prompt_embeds_mask=negative_mask, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(given, from_text, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"prompt_embeds_mask must be \(B, L\)"):
        pipe(prompt_embeds=embeds, prompt_embeds_mask=mask[:, :2], **kwargs)
    with pytest.raises(ValueError, match="DiTPipeline takes no precomputed text conditioning"):
        pipelines["dit"](prompt_embeds=torch.zeros(1, 4, 8), height=SIDE, width=SIDE, num_inference_steps=1)
