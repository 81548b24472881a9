"""UHR recommendations: patch size keeps the 1K token grid, the time shift follows the paper."""

from __future__ import annotations

import pytest

from l2p.sample import recommended_patch_size, recommended_shift


@pytest.mark.parametrize("side,patch", [(512, 16), (1024, 16), (2048, 32), (4096, 64), (8192, 128)])
def test_patch_keeps_4096_tokens(side, patch):
    assert recommended_patch_size(side, side) == patch
    assert (side // patch) ** 2 <= 4096


def test_shift_anchors():
    assert recommended_shift(1024, 1024) == pytest.approx(3.0)
    assert recommended_shift(512, 512) == pytest.approx(3.0)
    assert 4.0 <= recommended_shift(4096, 4096, 64) <= 5.0  # the paper's best at 4K
    assert recommended_shift(4096, 4096) == pytest.approx(4.5)
    s2k, s8k = recommended_shift(2048, 2048), recommended_shift(8192, 8192)
    assert 3.0 < s2k < 4.5 < s8k
    assert recommended_shift(4096, 4096, base_shift=1.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="multiple of the patch size 64"):
        recommended_shift(4000, 4096, 64)


@pytest.mark.parametrize("call, match", [
    (lambda: recommended_patch_size(0, 1024), "height must be a positive int, got 0"),
    (lambda: recommended_patch_size(4096, -4096), "width must be a positive int, got -4096"),
    (lambda: recommended_patch_size(4096, 4096, base_patch=0), "base_patch must be a positive int"),
    (lambda: recommended_patch_size(4096, 4096, max_tokens=0), "max_tokens must be a positive int"),
    (lambda: recommended_patch_size(4096.0, 4096), "height must be a positive int"),
    (lambda: recommended_shift(0, 0), "height must be a positive int, got 0"),
    (lambda: recommended_shift(-4096, 4096), "height must be a positive int"),
    (lambda: recommended_shift(4096, 4096, 0), "patch must be a positive int, got 0"),
    (lambda: recommended_shift(4096, 4096, base_shift=0), "base_shift must be a positive number"),
])
def test_recommendations_refuse_sizes_that_are_not_images(call, match):
    # A zero or negative side was answered with the 1K values (patch 16, shift 3),
    # max_tokens=0 with a patch larger than the image, base_patch=0 with a ZeroDivisionError.
    with pytest.raises(ValueError, match=match):
        call()


def _flux_like():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1's scheduler: mu from the token count, 4096 tokens (1K at P=16) -> max_shift 1.15.
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0)


def _sd3_like():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def test_recommended_keeps_the_source_schedule_up_to_1k_and_anchors_on_its_1k_shift():
    import math

    from l2p.sample.schedule import recipe_for, recommended_sampling_shift, source_shift_at_1k

    flux, sd3 = recipe_for("FluxTransformer2DModel"), recipe_for("SD3Transformer2DModel")
    for scheduler, recipe in ((_flux_like(), flux), (_sd3_like(), sd3)):
        for side in (512, 1024):
            assert recommended_sampling_shift(scheduler, recipe, side, side, 16, 16) is None
        assert recommended_sampling_shift(scheduler, recipe, 1024, 768, 16, 16) is None
    assert source_shift_at_1k(_sd3_like(), sd3, 16) == pytest.approx(3.0)
    assert source_shift_at_1k(_flux_like(), flux, 16) == pytest.approx(math.exp(1.15))
    # Above 1K: 1.5x the source's own 1K shift at 4K, whatever patch the pixel model has.
    assert recommended_sampling_shift(_sd3_like(), sd3, 4096, 4096, 64, 16) == pytest.approx(4.5)
    assert recommended_sampling_shift(_flux_like(), flux, 4096, 4096, 64, 16) == pytest.approx(1.5 * math.exp(1.15))
    k2 = recommended_sampling_shift(_flux_like(), flux, 2048, 2048, 32, 16)
    assert math.exp(1.15) < k2 < 1.5 * math.exp(1.15)
    with pytest.raises(ValueError, match="no flow time shift"):
        from diffusers import DDIMScheduler

        recommended_sampling_shift(DDIMScheduler(), sd3, 2048, 2048, 32, 16)


@pytest.mark.parametrize("name", ("sd3", "flux"))
def test_recommended_at_1k_or_less_samples_with_the_source_timesteps(pipelines, name):
    import torch

    pipe = pipelines[name]
    knob = {"true_cfg_scale": 1.0} if name == "flux" else {"guidance_scale": 1.0}

    def run(**kwargs):
        seen = []
        pipe(name, height=32, width=24, num_inference_steps=3, output_type="pt",
             generator=torch.Generator().manual_seed(0), **knob, **kwargs,
             callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or {})
        return seen

    assert run(shift="recommended") == run()
    assert run(shift=4.5) != run()


def test_sd3_sizes_beyond_its_position_table_are_refused_in_pixels(pipelines, capsys, converted, tmp_path):
    from l2p.cli import main as cli

    pipe = pipelines["sd3"]  # pos_embed_max_size 16, pixel patch 4: at most 64 px a side
    name = "a square"
    pipe(name, height=64, width=16, num_inference_steps=1, output_type="pt")
    with pytest.raises(ValueError, match=r"96x32 px .* at most 64 px a side at pixel patch 4"):
        pipe(name, height=96, width=32, num_inference_steps=1, output_type="pt")
    assert cli(["sample", "--model", str(converted["sd3"]), "--prompt", "x", "--height", "96", "--width", "32",
                "--steps", "1", "--out", str(tmp_path / "a.png")]) == 2
    assert "at most 64 px a side" in capsys.readouterr().err


def test_a_pipeline_built_in_memory_at_a_larger_patch_keeps_the_source_patch(pipelines, tmp_path):
    # SD3 converted at P=32 (twice its natural 2 x 8, the 4K recipe) and assembled in memory:
    # the recorded VAE factor is the source family's 8, not P / latent patch = 16, so after a
    # save and load the recommended shift still anchors on the source's 1K token grid.
    import l2p
    from l2p import L2PPipeline

    text = pipelines["sd3"].text_pipeline
    config = pipelines["sd3"].transformer.config.source_config
    latent = pipelines["sd3"].transformer.adapter.source_type().from_config(config)
    wide = l2p.convert_to_pixel(latent, vae_scale_factor=8, patch_size=32,
                                head={"type": "detailer", "channels": [4, 4, 4, 4, 4]})
    built = L2PPipeline(wide, text)
    assert built._source_patch() == 16
    built.save_pretrained(tmp_path / "wide")
    assert L2PPipeline.from_pretrained(tmp_path / "wide")._source_patch() == 16


def test_default_size_keeps_the_source_token_grid_at_a_larger_patch(sources, pipelines, tmp_path):
    # SD3 takes its default side from the config's sample_size, FLUX (no sample_size) from
    # FluxPipeline's 1024 px: converted at twice the patch, both default to twice the side, the
    # source's default token grid. FLUX stayed at 1024 px, a quarter of the tokens.
    from l2p import L2PPipeline
    from l2p.conversion import convert_folder

    for name in ("sd3", "flux"):
        pipe = pipelines[name]
        patch = pipe.transformer.config.patch_size
        convert_folder(sources[name], tmp_path / name, patch_size=2 * patch,
                       head={"type": "detailer", "channels": [4, 4, 4]}, log=lambda line: None)
        wide = L2PPipeline.from_pretrained(tmp_path / name)
        assert wide.default_size == 2 * pipe.default_size, name
        assert wide.default_size // wide.transformer.config.patch_size == pipe.default_size // patch
