"""`l2p toy diagnose`: the handoff and prompt-use measurements on a tiny source and its
(untrained) pixel conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2p.toy import source
from l2p.toy.diagnose import DiagnosePlan, feature_alignment, handoff, prompt_use

from _tiny_source import TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from l2p.conversion.folders import convert_folder
    from l2p.sample.pipeline import L2PPipeline

    root = tmp_path_factory.mktemp("diagnose")
    src = root / "toy-source"
    source.train_toy_source(TINY, src, "cpu", log=lambda _: None)
    convert_folder(src, root / "pixel")
    pipe = L2PPipeline.from_pretrained(root / "pixel")
    pipe.set_progress_bar_config(disable=True)
    source_pipe = source.load_toy_source(src)
    source_pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "two blue squares", "a green triangle to the left of a cross"]
    images = source.generate(source_pipe, prompts, seed=0, steps=2, guidance=4.5)
    return root, pipe, source_pipe, prompts, images


def test_handoff_from_sigma_zero_returns_the_source_images(tiny):
    _, pipe, _, prompts, images = tiny
    out = handoff(pipe, images, prompts, 0.0, steps=3, guidance=4.5, seed=0, batch_size=2)
    np.testing.assert_array_equal(out, images)


def test_handoff_is_noise_then_guided_euler_steps(tiny):
    _, pipe, _, prompts, images = tiny
    sigma, guidance = 0.8, 3.0
    out = handoff(pipe, images, prompts, sigma, steps=1, guidance=guidance, seed=5, batch_size=2)

    # One Euler step from sigma to 0 with the guided velocity, noise seeded per image.
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(5 + i))
                         for i in range(len(prompts))])
    x = (1 - sigma) * x0 + sigma * noise
    cond, uncond = pipe.encode_prompt(prompts)
    model, family = pipe.transformer, pipe.family
    times = torch.full((len(prompts),), sigma * 1000.0)
    with torch.no_grad():
        v_cond = model(**family.call(cond, x, times, model, 1.0), return_dict=False)[0]
        v_uncond = model(**family.call(uncond, x, times, model, 1.0), return_dict=False)[0]
    expected = x - sigma * (v_uncond + guidance * (v_cond - v_uncond))
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # batching of 2 vs 3: float order


def test_prompt_use_at_sigma_zero_is_exact_for_pixels_and_the_vae_round_trip_for_the_source(tiny):
    _, pipe, source_pipe, prompts, images = tiny
    row = prompt_use(pipe, source_pipe, images, prompts, 0.0, seed=0)
    # x_0 - 0 * v is the image itself, whatever the model says.
    assert row["pixel"]["prompt"] == 0.0 and row["pixel"]["empty"] == 0.0 and row["pixel"]["gain"] == 0.0
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = source_pipe.vae
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(x0).latent_dist.mean).sample.clamp(-1, 1)
    expected = float(((round_trip - x0) ** 2).mean())
    assert row["source"]["prompt"] == pytest.approx(expected, rel=1e-4)
    assert row["source"]["empty"] == pytest.approx(expected, rel=1e-4)


def test_prompt_use_differs_between_prompt_and_empty_at_high_noise(tiny):
    _, pipe, source_pipe, prompts, images = tiny
    row = prompt_use(pipe, source_pipe, images, prompts, 0.9, seed=0)
    for model in ("pixel", "source"):
        errors = row[model]
        assert np.isfinite([errors["prompt"], errors["empty"]]).all()
        assert errors["prompt"] != errors["empty"], model
        assert errors["gain"] == pytest.approx(1 - errors["prompt"] / errors["empty"])
    assert prompt_use(pipe, source_pipe, images, prompts, 0.9, seed=0) == row  # seeded


def test_feature_alignment_compares_every_block_input(tiny):
    _, pipe, source_pipe, prompts, images = tiny
    row = feature_alignment(pipe, source_pipe, images, prompts, 0.3, seed=0)
    names = [name for name, _ in pipe.transformer.blocks()]
    assert [b["block"] for b in row["blocks"]] == names and len(names) == TINY.layers
    for b in row["blocks"]:
        assert -1.0 <= b["same"] <= 1.0 and -1.0 <= b["other"] <= 1.0 and b["norm_ratio"] > 0
    # The hooks are gone afterwards, and the measurement is seeded.
    assert all(not block._forward_pre_hooks for _, block in pipe.transformer.blocks())
    assert feature_alignment(pipe, source_pipe, images, prompts, 0.3, seed=0) == row


@pytest.mark.slow
def test_diagnose_command_writes_both_reports(tiny, monkeypatch, capsys):
    from l2p.cli import main

    root = tiny[0]
    out = root / "report"
    args = ["toy", "diagnose", "--model", str(root / "pixel"), "--source", str(root / "toy-source"),
            "--out", str(out), "--prompts", "6", "--handoff-sigmas", "0,0.5,1", "--probe-sigmas", "0.9",
            "--steps", "2"]
    assert main(args) == 0
    report = json.loads((out / "diagnose.json").read_text())
    assert [r["sigma"] for r in report["handoff"]] == [0.0, 0.5, 1.0]
    # Handed the finished images, the pixel model changes nothing: the source's own score.
    assert report["handoff"][0]["overall"] == report["source"]["overall"]
    assert all(0.0 <= r["overall"] <= 1.0 for r in report["handoff"])
    assert all(len(r["correct"]) == 6 for r in report["handoff"])
    assert [r["sigma"] for r in report["prompt_use"]] == [0.9]
    assert [r["sigma"] for r in report["alignment"]] == [0.9]
    md = (out / "diagnose.md").read_text()
    assert "| 0.5 |" in md and "Prompt use" in md and "| transformer.transformer_blocks.1 |" in md
    assert "handoff from sigma 1" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--handoff-sigmas", "0.5,1.5"), ("--probe-sigmas", "x"),
                                         ("--prompts", "3")])
def test_diagnose_rejects_bad_arguments(flag, value, capsys):
    from l2p.cli import main

    assert main(["toy", "diagnose", "--model", "unused", flag, value]) == 2
    assert "l2p toy diagnose:" in capsys.readouterr().err


def test_plan_validation_names_the_field():
    with pytest.raises(ValueError, match="probe_sigmas"):
        DiagnosePlan(model="m", probe_sigmas=[]).validate()
