"""The embedded default of l2p-train, end to end on a tiny toy source: corpus from the
source, training, scoring of both models, report."""

from __future__ import annotations

import json

import pytest

from l2p.toy import source
from l2p.toy.migration import MigrationPlan, run_toy_migration

TINY = source.ToySourceConfig().scaled(
    image_size=32, vae_channels=(8, 16), layers=2, heads=2, head_dim=8, text_dim=16,
    text_layers=1, train_scenes=16, vae_steps=2, vae_batch=4, dit_steps=2, dit_batch=4,
    warmup_steps=1, workers=1,
)


@pytest.mark.slow
def test_toy_migration_end_to_end_and_resume(tmp_path, monkeypatch):
    src = tmp_path / "toy-source"
    source.train_toy_source(TINY, src, "cpu", log=lambda _: None)
    monkeypatch.setattr(source, "SHIPPED_SOURCE_DIR", src)
    plan = MigrationPlan(
        out_dir=str(tmp_path / "run"), corpus_prompts=6, eval_prompts=6, corpus_steps=2,
        eval_steps=2,
        train_overrides=["train.max_steps=3", "train.batch_size=2", "checkpoint.every=2",
                         "sample.every=0", "logging.progress_bar=false", "model.trainable=first_last:1"],
    )
    report = run_toy_migration(plan, log=lambda _: None)
    run = tmp_path / "run"
    assert report["train_steps"] == 3 and report["corpus_images"] == 6
    for key in ("source", "pixel"):
        assert 0.0 <= report[key]["overall"] <= 1.0 and len(report[key]["ci95"]) == 2
    assert json.loads((run / "report.json").read_text())["eval_prompts"] == 6
    assert "| L2P pixel model |" in (run / "report.md").read_text()
    assert (run / "loss.png").stat().st_size > 0
    assert (run / "train" / "final" / "pipeline" / "model_index.json").exists()
    assert len(list((run / "corpus" / "images").rglob("*.png"))) == 6

    # A second call resumes: nothing is rendered or trained again.
    again = run_toy_migration(plan, log=lambda _: None)
    assert again["train_steps"] == 3
    assert again["pixel"]["overall"] == report["pixel"]["overall"]


def test_eval_scores_source_and_pixel_folders(tmp_path, monkeypatch, capsys):
    import json

    from l2p.cli import main
    from l2p.conversion.folders import convert_folder
    from l2p.toy.prompts import write_prompts

    src = tmp_path / "toy-source"
    source.train_toy_source(TINY, src, "cpu", log=lambda _: None)
    convert_folder(src, tmp_path / "pixel")
    write_prompts(tmp_path / "prompts.jsonl", 6, seed=3)
    monkeypatch.setattr(source, "SHIPPED_SOURCE_DIR", src)
    for model in ("toy", str(tmp_path / "pixel")):
        out = tmp_path / "scores.json"
        args = ["eval", "--model", model, "--prompts", str(tmp_path / "prompts.jsonl"),
                "--out", str(out), "--steps", "2"]
        assert main(args) == 0
        scores = json.loads(out.read_text())
        assert scores["n"] == 6 and 0.0 <= scores["overall"] <= 1.0 and len(scores["ci95"]) == 2
        assert "overall" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "nope"), "--prompts", str(tmp_path / "prompts.jsonl")]) == 2
