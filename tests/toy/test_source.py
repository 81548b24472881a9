"""The toy source recipe end to end at a tiny size: it must produce a diffusers pipeline
folder that loads, samples and scores, with a truthful training record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2p.toy import source
from l2p.toy.evaluate import bootstrap_interval, score_generated
from l2p.toy.prompts import make_records
from l2p.toy.render import render_array

TINY = source.ToySourceConfig().scaled(
    image_size=32, vae_channels=(8, 16), layers=1, heads=2, head_dim=8, text_dim=16,
    text_layers=1, train_scenes=16, vae_steps=2, vae_batch=4, dit_steps=3, dit_batch=4,
    warmup_steps=1, workers=1,
)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toy") / "source"
    source.train_toy_source(TINY, out, "cpu", log=lambda _: None, command="test")
    return out


def test_tokenizer_keeps_shapesworld_words_whole():
    tok = source.build_toy_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("two red circles to the left of a blue square").input_ids)
    assert pieces == ["\u2581two", "\u2581red", "\u2581circles", "\u2581to", "\u2581the", "\u2581left",
                      "\u2581of", "\u2581a", "\u2581blue", "\u2581square", "</s>"]
    assert "<unk>" not in tok.convert_ids_to_tokens(tok("a zebra").input_ids)


def test_trained_folder_loads_with_diffusers_and_records_its_run(tiny_source):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_source, local_files_only=True, use_safetensors=True)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.sample_size == 16
    record = json.loads((tiny_source / "training_record.json").read_text())
    assert record["steps_run"] == {"vae": 2, "transformer": 3}
    assert record["command"] == "test" and record["config"]["image_size"] == 32
    assert pipe.vae.config.scaling_factor > 0


def test_generate_is_seeded(tiny_source):
    pipe = source.load_toy_source(tiny_source)
    a = source.generate(pipe, ["a red circle", "two squares"], seed=3, steps=2)
    b = source.generate(pipe, ["a red circle", "two squares"], seed=3, steps=2)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_missing_source_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="l2p toy train-source"):
        source.load_toy_source(tmp_path)


def test_time_budget_shrinks_the_schedule_only_when_needed(monkeypatch):
    monkeypatch.setattr(source.time, "time", lambda: 100.0)
    # 20 steps took 10 s: a 30 s budget fits 60 steps; no budget keeps the plan.
    assert source._fit_steps(1000, 20, 90.0, 30.0) == 60
    assert source._fit_steps(1000, 20, 90.0, 0.0) == 1000
    assert source._fit_steps(40, 20, 90.0, 1e6) == 40
    assert source._fit_steps(1000, 20, 90.0, 1.0) == 21  # never fewer than the steps already run


def test_scoring_ground_truth_gives_full_marks_with_an_interval():
    records = make_records(36, seed=5, split="heldout")
    images = [render_array(r.scene, 64) for r in records]
    summary = score_generated(images, records)
    assert summary["overall"] == 1.0 and summary["ci95"] == (1.0, 1.0)
    assert summary["failures"] == []
    blank = [np.zeros((64, 64, 3), np.uint8) for _ in records]
    assert score_generated(blank, records)["overall"] == 0.0


def test_bootstrap_interval_brackets_the_estimate():
    class R:
        def __init__(self, category, correct):
            self.category, self.correct = category, correct

    results = [R("counting", i % 2 == 0) for i in range(200)] + [R("colors", True)] * 200
    low, high = bootstrap_interval(results, rounds=300)
    assert low < 0.75 < high and high - low < 0.15
