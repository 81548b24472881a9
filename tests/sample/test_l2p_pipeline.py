"""L2PPipeline end to end from converted tiny PixArt-Sigma, SD3 and FLUX pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

FAMILIES = ("pixart", "sd3", "flux")  # the converted tiny pipelines of conftest.py


def _run(pipe, prompt="a red circle", **kwargs):
    kwargs = {"height": 32, "width": 24, "num_inference_steps": 2, "output_type": "pt", **kwargs}
    return pipe(prompt, **kwargs).images


@pytest.mark.parametrize("name", FAMILIES)
def test_output_types_sizes_and_seeds(pipelines, name):
    pipe = pipelines[name]
    pil = pipe("a red circle", height=32, width=24, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (24, 32)
    arr = pipe(["a red circle", "two blue squares"], height=16, width=40, num_inference_steps=2,
               num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arr.shape == (4, 16, 40, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    a = _run(pipe, generator=torch.Generator().manual_seed(3))
    b = _run(pipe, generator=torch.Generator().manual_seed(3))
    c = _run(pipe, generator=torch.Generator().manual_seed(4))
    assert a.shape == (1, 3, 32, 24) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    same = _run(pipe, generator=torch.Generator().manual_seed(0))
    assert np.allclose(np.asarray(pil[0]) / 255.0, same[0].permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_of_prompts_is_each_prompt_alone(pipelines, name):
    from _checks import assert_batch_is_each_prompt_alone

    knob = {"true_cfg_scale": 4.0} if name == "flux" else {"guidance_scale": 4.0}
    assert_batch_is_each_prompt_alone(pipelines[name], ["a red circle", "two small blue squares on green"],
                                      ["blurry", ""], height=16, width=24, **knob)


@pytest.mark.parametrize("name", FAMILIES)
def test_cfg_off_and_on(pipelines, name):
    pipe = pipelines[name]
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    # FLUX is guidance-distilled: guidance_scale feeds its embedding, true_cfg_scale is CFG.
    knob = "true_cfg_scale" if name == "flux" else "guidance_scale"
    try:
        off = _run(pipe, generator=torch.Generator().manual_seed(0), **{knob: 1.0})
        assert batches == [1, 1]
        batches.clear()
        on = _run(pipe, generator=torch.Generator().manual_seed(0), **{knob: 5.0})
        assert batches == [2, 2]
        neg = _run(pipe, negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **{knob: 5.0})
    finally:
        hook.remove()
    assert (on - off).abs().max() > 1e-4 and (neg - on).abs().max() > 1e-4


@pytest.mark.parametrize("name", ("pixart", "sd3"))
def test_guidance_only_up_to_a_noise_level(pipelines, name):
    """guidance_max_sigma: steps noisier than it run the conditional branch alone (batch 1),
    the others are guided (batch 2); at or above every step's sigma it is plain guidance, below
    every one it is the unguided image."""
    pipe = pipelines[name]
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)

    def run(**kwargs):
        batches.clear()
        return _run(pipe, generator=torch.Generator().manual_seed(0), num_inference_steps=4, **kwargs)

    try:
        guided = run(guidance_scale=5.0)
        sigmas = [float(s) for s in pipe.scheduler.sigmas[:4]]
        assert sigmas == sorted(sigmas, reverse=True) and batches == [2, 2, 2, 2]
        assert torch.equal(run(guidance_scale=5.0, guidance_max_sigma=sigmas[0]), guided)
        assert batches == [2, 2, 2, 2]
        late = run(guidance_scale=5.0, guidance_max_sigma=sigmas[2])
        assert batches == [1, 1, 2, 2] and (late - guided).abs().max() > 1e-4
        unguided = run(guidance_scale=1.0)
        assert torch.equal(run(guidance_scale=5.0, guidance_max_sigma=0.0), unguided)
        assert batches == [1, 1, 1, 1]
    finally:
        hook.remove()
    for bad in (-0.1, "0.5", True):
        with pytest.raises(ValueError, match="guidance_max_sigma must be a noise level >= 0"):
            _run(pipe, guidance_max_sigma=bad)


def test_flux_position_ids_stay_exact_past_256_tokens_in_bfloat16(pipelines):
    # Made in the sample's dtype, a bfloat16 sample's img_ids rounded 257 to 256 and 259 to 260:
    # of 300 columns only 279 distinct positions.
    from l2p.train.conditioning import family_for

    pipe = pipelines["flux"]
    p = pipe.transformer.config.patch_size
    cond = {"prompt_embeds": torch.zeros(1, 5, 32, dtype=torch.bfloat16),
            "pooled_prompt_embeds": torch.zeros(1, 16, dtype=torch.bfloat16)}
    x = torch.zeros(1, 3, 2 * p, 300 * p, dtype=torch.bfloat16)
    call = family_for("FluxTransformer2DModel").call(cond, x, torch.tensor([500.0]), pipe.transformer, 3.5)
    ids = call["img_ids"].reshape(2, 300, 3)
    assert torch.equal(ids[..., 1], torch.arange(2.0)[:, None].expand(2, 300))
    assert torch.equal(ids[..., 2], torch.arange(300.0)[None, :].expand(2, 300))


def test_flux_guidance_scale_feeds_the_embedding(pipelines):
    pipe = pipelines["flux"]
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["guidance"].tolist()), with_kwargs=True)
    try:
        _run(pipe, guidance_scale=2.5, num_inference_steps=1)
    finally:
        hook.remove()
    assert seen == [[2.5]]


@pytest.mark.parametrize("size", [(30, 32), (32, 2), (0, 32)])
def test_size_not_multiple_of_patch(pipelines, size):
    with pytest.raises(ValueError, match="multiple of the pixel patch size 4"):
        pipelines["pixart"]("x", height=size[0], width=size[1], num_inference_steps=1)


def test_bad_arguments(pipelines, converted, sources):
    pipe = pipelines["pixart"]
    with pytest.raises(ValueError, match="output_type"):
        _run(pipe, output_type="latent")
    with pytest.raises(ValueError, match="negative_prompt has 2 entries"):
        _run(pipe, negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="latents must have shape"):
        _run(pipe, latents=torch.zeros(1, 3, 8, 8))
    from l2p import L2PPipeline

    with pytest.raises(ValueError, match="not a converted L2P pipeline"):
        L2PPipeline.from_pretrained(sources["pixart"])
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        L2PPipeline.from_pretrained(converted["pixart"] / "transformer")


def test_given_latents_and_generator_list(pipelines):
    pipe = pipelines["sd3"]
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = _run(pipe, prompt=["a", "a"], generator=gens)
    one = _run(pipe, prompt="a", generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)
    noise = torch.randn(1, 3, 32, 24, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(_run(pipe, prompt="a", latents=noise), one, rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_timesteps_match_the_source_pipeline(sources, pipelines, name):
    """The schedule (incl. FLUX's custom sigmas and dynamic mu from the token count) is the one
    the source pipeline sets for the same token grid: 32x48 pixels at P=4 <-> a 16x24 latent."""
    from diffusers import DiffusionPipeline

    source = DiffusionPipeline.from_pretrained(str(sources[name]))
    source.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if name == "pixart" else {}
    source("x", height=32, width=48, num_inference_steps=4, output_type="latent",
           generator=torch.Generator().manual_seed(0), **extra)
    theirs = source.scheduler
    pipe = pipelines[name]
    _run(pipe, prompt="x", height=32, width=48, num_inference_steps=4)
    torch.testing.assert_close(pipe.scheduler.timesteps, theirs.timesteps)
    torch.testing.assert_close(pipe.scheduler.sigmas, theirs.sigmas)


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_negative_conditioning_is_the_sources(sources, pipelines, name):
    """The unconditional branch is what the source's encode_prompt gives for CFG."""
    from diffusers import DiffusionPipeline

    source = DiffusionPipeline.from_pretrained(str(sources[name]))
    cond, uncond = pipelines[name].encode_prompt(["a red circle"], "blurry")
    if name == "pixart":
        pe, pm, npe, npm = source.encode_prompt("a red circle", True, negative_prompt="blurry")
        pairs = [(cond["prompt_embeds"], pe), (uncond["prompt_embeds"], npe), (uncond["prompt_attention_mask"], npm)]
    else:
        pe, npe, ppe, nppe = source.encode_prompt("a red circle", None, None, do_classifier_free_guidance=True,
                                                  negative_prompt="blurry")
        pairs = [(cond["prompt_embeds"], pe), (uncond["prompt_embeds"], npe), (uncond["pooled_prompt_embeds"], nppe)]
    for ours, theirs in pairs:  # the source encodes both in one batch: rounding differs
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_modes_give_the_same_image(pipelines, name):
    pipe = pipelines[name]
    images = {}
    try:
        for mode in ("native", "l2p"):
            pipe.set_attention(mode)
            images[mode] = _run(pipe, generator=torch.Generator().manual_seed(0), guidance_scale=3.0)
    finally:
        pipe.set_attention("auto")
    torch.testing.assert_close(images["l2p"], images["native"], rtol=1e-5, atol=1e-5)
    from l2p.sample.attention import attention_mode, resolve_attention

    _run(pipe, num_inference_steps=1)  # "auto" is applied at each call
    assert attention_mode(pipe.transformer) == resolve_attention("auto", torch.device("cpu"), torch.float32)


def test_head_tiling_keeps_the_image(pipelines):
    pipe = pipelines["pixart"]
    full = _run(pipe, generator=torch.Generator().manual_seed(0), height=40, width=28)
    pipe.enable_head_tiling(12)
    try:
        tiled = _run(pipe, generator=torch.Generator().manual_seed(0), height=40, width=28)
    finally:
        pipe.disable_head_tiling()
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


def test_scheduler_config_with_shift(pipelines):
    """What a model trained at a fixed shift samples with: the shift in the config, dynamic
    shifting off; the timesteps are those of with_shift's (scheduler, mu) route."""
    from l2p.sample.schedule import recipe_for, scheduler_config_with_shift, set_timesteps, with_shift

    sd3 = pipelines["sd3"].scheduler  # static shift 3
    config = scheduler_config_with_shift(dict(sd3.config), 5.0)
    assert config["shift"] == 5.0 and sd3.config["shift"] == 3.0
    recipe = recipe_for("SD3Transformer2DModel")
    torch.testing.assert_close(
        set_timesteps(type(sd3).from_config(config), recipe, 6, 48, "cpu"),
        set_timesteps(with_shift(sd3, 5.0)[0], recipe, 6, 48, "cpu"))

    flux = pipelines["flux"].scheduler  # dynamic shifting
    config = scheduler_config_with_shift(dict(flux.config), 4.5)
    assert config["shift"] == 4.5 and config["use_dynamic_shifting"] is False
    recipe = recipe_for("FluxTransformer2DModel")
    sched, mu = with_shift(flux, 4.5)
    torch.testing.assert_close(
        set_timesteps(type(flux).from_config(config), recipe, 6, 64, "cpu"),
        set_timesteps(sched, recipe, 6, 64, "cpu", mu=mu).clone())

    with pytest.raises(ValueError, match="no flow time shift"):
        scheduler_config_with_shift({"_class_name": "DDPMScheduler", "beta_start": 1e-4}, 3.0)
    with pytest.raises(ValueError, match="positive number"):
        scheduler_config_with_shift(dict(sd3.config), -1.0)


def test_shift_override(pipelines):
    from l2p.sample.schedule import recipe_for, set_timesteps, with_shift

    pipe = pipelines["sd3"]  # FlowMatchEuler with shift 3
    recipe = recipe_for("SD3Transformer2DModel")
    same, mu = with_shift(pipe.scheduler, 3.0)
    assert mu is None and same is not pipe.scheduler
    base = set_timesteps(pipe.scheduler, recipe, 4, 48, "cpu").clone()
    torch.testing.assert_close(set_timesteps(same, recipe, 4, 48, "cpu"), base)
    more, _ = with_shift(pipe.scheduler, 6.0)
    shifted = set_timesteps(more, recipe, 4, 48, "cpu").clone()
    assert (shifted[1:] > base[1:]).all()  # more shift: noisier times at each step
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True)
    try:
        _run(pipe, num_inference_steps=4, shift=6.0)
    finally:
        hook.remove()
    assert seen == pytest.approx(shifted.tolist())
    torch.testing.assert_close(pipe.scheduler.timesteps, base)  # the pipeline's own is untouched

    flux = pipelines["flux"]  # dynamic shifting: mu = log(shift)
    flux_recipe = recipe_for("FluxTransformer2DModel")
    sched, mu = with_shift(flux.scheduler, 4.5)
    assert sched is flux.scheduler and mu == pytest.approx(np.log(4.5))
    hi = set_timesteps(sched, flux_recipe, 4, 64, "cpu", mu=mu).clone()
    lo = set_timesteps(sched, flux_recipe, 4, 64, "cpu").clone()
    assert (hi[1:] > lo[1:]).all()
    with pytest.raises(ValueError, match="positive number"):
        _run(pipe, shift=0)
    seen.clear()
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True)
    try:  # "recommended" at this tiny size (< 1K) is the 1K anchor, 3
        _run(pipe, num_inference_steps=4, shift="recommended")
    finally:
        hook.remove()
    assert seen == pytest.approx(set_timesteps(with_shift(pipe.scheduler, 3.0)[0], recipe, 4, 48, "cpu").tolist())


def test_toy_source_flow_dpm_solver(tmp_path):
    """The toy source's recipe (PixArt-Sigma, DPM-Solver in flow mode with a flow shift): the
    converted pipeline samples with the source's own flow schedule."""
    from diffusers import DiffusionPipeline

    from l2p import L2PPipeline
    from l2p.conversion import convert_folder
    from l2p.toy.source import ToySourceConfig, build_toy_pipeline

    small = ToySourceConfig(layers=1, heads=2, head_dim=16, vae_channels=(8, 8, 8), text_dim=32,
                            text_layers=1, flow_shift=2.0)
    build_toy_pipeline(small, seed=0).save_pretrained(str(tmp_path / "toy"), safe_serialization=True)
    convert_folder(tmp_path / "toy", tmp_path / "pixel", head={"type": "detailer", "channels": [8, 8, 16]})
    pipe = L2PPipeline.from_pretrained(tmp_path / "pixel")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.patch_size == 8 and pipe.scheduler.config.prediction_type == "flow_prediction"
    images = pipe("two red circles", height=32, width=48, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()
    source = DiffusionPipeline.from_pretrained(str(tmp_path / "toy"))
    source.set_progress_bar_config(disable=True)
    source("two red circles", height=32, width=48, num_inference_steps=3, output_type="latent",
           use_resolution_binning=False)
    torch.testing.assert_close(pipe.scheduler.timesteps, source.scheduler.timesteps)
    torch.testing.assert_close(pipe.scheduler.sigmas, source.scheduler.sigmas)


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_save_pretrained_round_trip(pipelines, converted, name, tmp_path):
    from l2p import L2PPipeline

    pipe = pipelines[name]
    pipe.save_pretrained(tmp_path / "saved")
    again = L2PPipeline.from_pretrained(tmp_path / "saved")
    a = _run(pipe, generator=torch.Generator().manual_seed(0))
    b = _run(again, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_l2p"] == json.loads((converted[name] / "model_index.json").read_text())["_l2p"]
    assert not (tmp_path / "saved" / "vae").exists()
    assert not list((tmp_path / "saved").rglob("*.bin")) and list((tmp_path / "saved").rglob("*.safetensors"))
    with pytest.raises(ValueError, match="not empty"):
        pipe.save_pretrained(tmp_path / "saved")
    # diffusers' keyword, as scripts written for diffusers pipelines pass it; pickle is refused.
    pipe.save_pretrained(tmp_path / "safe", safe_serialization=True)
    assert (tmp_path / "safe" / "model_index.json").is_file()
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()
    # A pipeline assembled in memory describes its conversion itself.
    built = L2PPipeline(again.transformer, again.text_pipeline)
    built.save_pretrained(tmp_path / "built")
    assert json.loads((tmp_path / "built" / "model_index.json").read_text())["_l2p"]["patch_size"] == \
        index["_l2p"]["patch_size"]


def test_callback_on_step_end_sees_and_replaces_the_sample(pipelines):
    pipe = pipelines["pixart"]
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, tuple(kwargs["latents"].shape)))
        if i == 0:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    plain = _run(pipe, generator=torch.Generator().manual_seed(0))
    replaced = _run(pipe, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback)
    assert [i for i, _ in seen] == list(range(len(seen))) and len(seen) >= 2
    assert seen[0][1][1:] == (3, plain.shape[2], plain.shape[3])
    assert not torch.equal(plain, replaced)
    with pytest.raises(ValueError, match="latents"):
        _run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_a_stochastic_scheduler_draws_its_step_noise_from_the_generator(pipelines, name):
    """A scheduler that adds noise at each step (set the diffusers way, pipe.scheduler = ...)
    takes it from the call's generator: a seed gives one image, and image i of a batch seeded
    with a list equals that image generated alone with the same generator."""
    from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    pipe = pipelines[name]
    own = pipe.scheduler
    if name == "pixart":
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(own.config)
    else:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(own.config, stochastic_sampling=True)
    try:
        assert pipe.text_pipeline.scheduler is pipe.scheduler
        a = _run(pipe, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
        b = _run(pipe, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
        assert torch.equal(a, b)
        both = _run(pipe, prompt=["a", "b"], num_inference_steps=3,
                    generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
        alone = _run(pipe, prompt="b", generator=torch.Generator().manual_seed(2), num_inference_steps=3)
        torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    finally:
        pipe.scheduler = own


def test_ddim_eta_reaches_the_scheduler_and_is_refused_where_there_is_none(pipelines):
    from diffusers import DDIMScheduler

    pipe = pipelines["pixart"]
    own = pipe.scheduler
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's; DPMSolverMultistepScheduler takes none"):
        _run(pipe, eta=0.5, generator=torch.Generator().manual_seed(0))
    pipe.scheduler = DDIMScheduler.from_config(own.config)
    try:
        plain = _run(pipe, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
        noisy = _run(pipe, eta=1.0, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
        again = _run(pipe, eta=1.0, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
        assert torch.equal(noisy, again) and (noisy - plain).abs().max() > 1e-3
        assert torch.equal(_run(pipe, eta=0.0, generator=torch.Generator().manual_seed(0), num_inference_steps=3),
                           plain)
    finally:
        pipe.scheduler = own


@pytest.mark.parametrize("count", [1, 3])
def test_a_generator_list_must_hold_one_generator_per_image(pipelines, count):
    """As in the diffusers pipelines: a list of generators of another length than the batch
    (2 prompts x 1 image) is refused, not reused (length 1) or cut short (length 3)."""
    gens = [torch.Generator().manual_seed(s) for s in range(count)]
    with pytest.raises(ValueError, match=f"list of {count} generators for 2 images"):
        _run(pipelines["pixart"], prompt=["a", "b"], generator=gens)


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_dtype_loads_every_weight_in_that_dtype(converted, name):
    """from_pretrained(torch_dtype=torch.bfloat16) gives a bfloat16 transformer for every family
    (SD3's float32 position table used to keep all its weights in float32, silently), and it
    samples: float32 images in [0, 1]."""
    from l2p import L2PPipeline

    pipe = L2PPipeline.from_pretrained(converted[name], torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert {t.dtype for t in pipe.transformer.parameters()} == {torch.bfloat16} and pipe.dtype == torch.bfloat16
    image = _run(pipe, generator=torch.Generator().manual_seed(0), num_inference_steps=1)
    assert image.dtype == torch.float32 and torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1


def test_custom_schedules_are_refused_by_name(pipelines):
    for kwargs in ({"timesteps": [999, 500]}, {"sigmas": [1.0, 0.5]}):
        with pytest.raises(TypeError, match=r"takes no (timesteps|sigmas); choose it with num_inference_steps"):
            pipelines["sd3"]("a", height=32, width=24, num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_precomputed_embeddings_give_the_prompts_images(pipelines, name):
    """prompt_embeds & co. by the source pipeline's names (PixArt: + prompt_attention_mask;
    SD3, FLUX: + pooled_prompt_embeds) sample what the prompts do; without negative ones,
    guidance encodes negative_prompt as for text."""
    pipe = pipelines[name]
    prompts, negatives = ["a red circle", "two blue squares to the left of a green triangle"], ["blurry", ""]
    cond, uncond = pipe.encode_prompt(prompts, negatives)
    kwargs = {"height": 16, "width": 8, "num_inference_steps": 2, "output_type": "pt", "guidance_scale": 5.0,
              "true_cfg_scale": 5.0}

    def run(**more):
        return pipe(generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kwargs, **more).images

    from_text = run(prompt=prompts, negative_prompt=negatives)
    given = run(**cond, **{f"negative_{k}": v for k, v in uncond.items()})
    torch.testing.assert_close(given, from_text, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(**cond, negative_prompt=negatives), from_text, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        run(prompt=prompts, **cond)
    with pytest.raises(ValueError, match="either negative_prompt or negative_prompt_embeds"):
        run(**cond, negative_prompt=negatives, **{f"negative_{k}": v for k, v in uncond.items()})
    partial = dict(cond)
    second = [k for k in cond if k != "prompt_embeds"][0]
    del partial[second]
    with pytest.raises(ValueError, match=f"missing {second}"):
        run(**partial)
    with pytest.raises(ValueError, match="given without prompt_embeds"):
        run(prompt=None, negative_prompt_embeds=uncond["prompt_embeds"])
    with pytest.raises(ValueError, match="one row per prompt"):
        run(**{**cond, second: cond[second][:1]})


def test_a_refused_attention_mode_leaves_the_pipeline_as_it_was(pipelines):
    # The mode was recorded before it was checked: every later call failed on it.
    pipe = pipelines["pixart"]
    before = pipe.attention
    with pytest.raises(ValueError, match="attention must be one of"):
        pipe.set_attention("flash")
    assert pipe.attention == before
    assert _run(pipe, height=8, width=8, num_inference_steps=1).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"guidance_scale": "4.5"}, "guidance_scale must be a number, got '4.5'"),
    ({"true_cfg_scale": "4"}, "true_cfg_scale must be a number"),
    ({"num_images_per_prompt": True}, "num_images_per_prompt must be a positive int"),
    ({"generator": 0}, r"torch.Generator\(\).manual_seed\(s\)"),
    ({"generator": [None]}, "generator must be a torch.Generator or a list of them"),
    ({"latents": [[0.0]]}, r"latents must be a tensor \(B, 3, H, W\)"),
    ({"callback_on_step_end": lambda pipe, i, t, kw: (kw["latents"],)}, "must return a dict"),
    ({"callback_on_step_end": lambda pipe, i, t, kw: {"latents": kw["latents"][..., :4]}},
     r"returned latents \(1, 3, 8, 4\); the pixel-space sample it replaces is \(1, 3, 8, 8\)"),
])
def test_call_arguments_of_the_wrong_kind_are_named(pipelines, kwargs, match):
    # These failed as "unsupported operand type(s) for +", "'int' object has no attribute
    # 'device'", "'list' object has no attribute 'shape'" or "'tuple' object has no attribute
    # 'get'"; True was taken as one image per prompt, and a callback's latents of another size
    # went on to be sampled as a smaller image than asked for.
    with pytest.raises(ValueError, match=match):
        _run(pipelines["pixart"], height=8, width=8, **kwargs)


def test_numpy_integer_sizes_are_sizes(pipelines):
    # np.int64(8) was refused as "must be a positive multiple of the pixel patch size 4, got 8".
    pipe = pipelines["pixart"]
    image = _run(pipe, height=np.int64(8), width=np.int32(12), generator=torch.Generator().manual_seed(0))
    assert image.shape == (1, 3, 8, 12)
    torch.testing.assert_close(image, _run(pipe, height=8, width=12, generator=torch.Generator().manual_seed(0)),
                               rtol=0, atol=0)
    # numpy's numbers for the shift and the head's tile size too (np.float32 is no float).
    shifted = _run(pipe, height=8, width=12, shift=np.float32(2.0), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, _run(pipe, height=8, width=12, shift=2.0,
                                             generator=torch.Generator().manual_seed(0)), rtol=0, atol=0)
    pipe.enable_head_tiling(np.int64(4))
    try:
        assert pipe.transformer.head.tile_size == 4 and type(pipe.transformer.head.tile_size) is int
    finally:
        pipe.disable_head_tiling()


@pytest.mark.parametrize("count", [0, -1, True, 2.0])
def test_encode_prompt_refuses_a_count_that_is_not_a_number_of_images(pipelines, count):
    # 0 returned empty conditioning, True one copy; -1 and 2.0 failed inside repeat_interleave.
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive int"):
        pipelines["pixart"].encode_prompt("a red circle", num_images_per_prompt=count)


def test_a_latent_transformer_is_not_a_pipelines_transformer(pipelines):
    # Failed with "'FrozenDict' object has no attribute 'source_class'".
    from l2p import L2PPipeline

    pipe = pipelines["sd3"]
    latent = pipe.transformer.adapter.source_type().from_config(pipe.transformer.config.source_config)
    with pytest.raises(TypeError, match="got SD3Transformer2DModel; convert a latent one with l2p.convert_to_pixel"):
        L2PPipeline(latent, pipe.text_pipeline)


@pytest.mark.parametrize("name", FAMILIES)
def test_arguments_left_out_take_the_source_pipelines_defaults(pipelines, name):
    """num_inference_steps and guidance_scale left out sample as the source pipeline would
    (PixArt 20 steps at 4.5, SD3 28 at 7.0, FLUX 28 at 3.5), not at one setting for all."""
    import inspect

    pipe = pipelines[name]
    defaults = inspect.signature(type(pipe.text_pipeline).__call__).parameters
    steps, guidance = defaults["num_inference_steps"].default, defaults["guidance_scale"].default
    assert (steps, guidance) == {"pixart": (20, 4.5), "sd3": (28, 7.0), "flux": (28, 3.5)}[name]
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        left_out = pipe("a red circle", height=8, width=8, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images
        assert len(calls) == steps  # one model call per step (the guided pair is one batch)
        explicit = pipe("a red circle", height=8, width=8, output_type="pt", num_inference_steps=steps,
                        guidance_scale=guidance, true_cfg_scale=1.0,
                        generator=torch.Generator().manual_seed(0)).images
    finally:
        hook.remove()
    assert torch.equal(left_out, explicit)
