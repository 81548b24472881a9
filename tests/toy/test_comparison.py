"""Paired comparisons of two scored toy runs (l2p.toy.comparison, ``l2p compare``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from l2p.cli import main
from l2p.toy.comparison import SOURCE_EVAL_SEEDS, compare_runs, load_scored_run
from l2p.toy.prompts import make_records, read_prompts, save_records
from l2p.toy.render import render_array
from l2p.toy.scorer import SCORER_VERSION
from l2p.toy.scoring import paired_comparison, records_digest, score_generated
from l2p.toy.source import SHIPPED_SOURCE_DIR
from l2p.toy.world import CATEGORIES


def test_paired_comparison_reads_each_category_alone():
    categories = np.repeat(CATEGORIES, 20)
    a = np.zeros(categories.size, bool)
    b = np.zeros(categories.size, bool)
    a[categories == "colors"] = True              # A gets every colours prompt, B none
    a[categories == "position"] = np.arange(20) % 2 == 0
    b[categories == "position"] = np.arange(20) % 2 == 1
    result = paired_comparison(a, b, categories, rounds=300)
    assert result["overall"]["difference"] == pytest.approx(1 / 6)
    per = result["per_category"]
    assert per["colors"]["difference"] == 1.0 and per["colors"]["ci95"] == (1.0, 1.0)
    assert per["colors"]["beyond_noise"]
    # Position: A and B right on different prompts, equally often: no difference, wide interval.
    assert per["position"]["difference"] == 0.0 and not per["position"]["beyond_noise"]
    assert per["position"]["ci95"][0] < -0.2 and per["position"]["ci95"][1] > 0.2
    assert per["single_object"] == {"difference": 0.0, "ci95": (0.0, 0.0), "beyond_noise": False,
                                    "training_seeds": 1}


def _scores_file(path, records, images, **sampling):
    summary = score_generated(images, records)
    summary.update({"model": "m", "prompts": "p.jsonl", "seed": 0, "steps": 20, "guidance": 4.5, **sampling})
    path.write_text(json.dumps(summary))
    return path


def test_compare_scores_files_and_refuse_unpaired_ones(tmp_path, capsys):
    records = make_records(24, seed=5, split="heldout")
    truth = [render_array(r.scene, 64) for r in records]
    blank = [np.zeros((64, 64, 3), np.uint8) for _ in records]
    good = _scores_file(tmp_path / "good.json", records, truth)
    bad = _scores_file(tmp_path / "bad.json", records, blank, guidance=2.0, noise_device="cuda")
    report = compare_runs(load_scored_run(good), load_scored_run(bad), rounds=100)
    assert report["difference"]["overall"]["difference"] == 1.0
    assert report["difference"]["overall"]["beyond_noise"]
    assert report["per_category_a"] == {c: 1.0 for c in CATEGORIES}
    assert report["sampling_differs_in"] == ["guidance", "noise_device"]

    assert main(["compare", str(good), str(bad), "--rounds", "100"]) == 0
    out = capsys.readouterr().out
    assert "colors         1.00 vs 0.00  +1.000 (+1.000 to +1.000)  beyond noise" in out
    assert "different guidance, noise_device (paired by prompt only" in out

    other = _scores_file(tmp_path / "other.json", make_records(24, seed=6, split="heldout"), blank)
    assert main(["compare", str(good), str(other)]) == 2
    assert "scored on different prompts" in capsys.readouterr().err
    old = json.loads(good.read_text())
    del old["records_digest"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["compare", str(tmp_path / "old.json"), str(good)]) == 2
    assert "score the model again with l2p eval" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["compare", str(tmp_path / "list.json"), str(good)]) == 2
    assert main(["compare", str(tmp_path / "missing.json"), str(good)]) == 2
    assert "no such scores file" in capsys.readouterr().err


def test_compare_reads_a_sources_training_record(tmp_path, capsys):
    """The shipped source's record predates the digest: its prompts are rebuilt from the fixed
    stream train-source scores on, and checked against the record's per-category accuracies."""
    record = json.loads((SHIPPED_SOURCE_DIR / "training_record.json").read_text())
    shipped = load_scored_run("toy", "heldout")
    n = len(record["eval"]["heldout"]["correct"])
    rebuilt = make_records(n, SOURCE_EVAL_SEEDS["heldout"], split="heldout")
    assert shipped.records_digest == records_digest(rebuilt)
    for c, accuracy in record["eval"]["heldout"]["per_category"].items():
        assert shipped.correct[shipped.categories == c].mean() == pytest.approx(accuracy)

    # A scores file from l2p eval on those same prompts pairs with the record.
    save_records(tmp_path / "heldout.jsonl", rebuilt)
    blank = [np.zeros((64, 64, 3), np.uint8) for _ in rebuilt]
    scores = _scores_file(tmp_path / "blank.json", rebuilt, blank)
    assert main(["compare", "toy", str(scores), "--rounds", "50"]) == 0
    out = capsys.readouterr().out
    assert f"+{record['eval']['heldout']['overall']:.3f}" in out
    assert "int8" not in out  # neither side is int8, whether or not its file says so
    with_int8 = _scores_file(tmp_path / "blank-full.json", rebuilt, blank, int8=False)
    assert "int8" not in compare_runs(shipped, load_scored_run(str(with_int8)), rounds=20)["sampling_differs_in"]

    # `l2p toy prompts` writes the same stream, so l2p eval can score any model on it.
    assert main(["toy", "prompts", "--out", str(tmp_path / "cli.jsonl"), "--seed", "1000", "--num", str(n)]) == 0
    assert records_digest(read_prompts(tmp_path / "cli.jsonl")) == shipped.records_digest
    assert main(["toy", "prompts", "--out", str(tmp_path / "x.jsonl"), "--categories", "colours"]) == 2
    assert "--categories takes some of" in capsys.readouterr().err
    assert main(["toy", "prompts", "--out", str(tmp_path / "x.jsonl"), "--num", "2", "--split", "train",
                 "--categories", "position,counting"]) == 0
    assert [r.category for r in read_prompts(tmp_path / "x.jsonl")] == ["position", "counting"]

    # A record whose scores do not match the rebuilt prompts is refused, not mispaired.
    folder = tmp_path / "source"
    folder.mkdir()
    shutil.copy(SHIPPED_SOURCE_DIR / "model_index.json", folder)
    record["eval"]["heldout"]["per_category"]["colors"] = 0.5
    (folder / "training_record.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not made on the prompts"):
        load_scored_run(str(folder), "heldout")
    del record["eval"]
    (folder / "training_record.json").write_text(json.dumps(record))
    assert main(["compare", str(folder), "toy"]) == 2
    assert "holds no heldout scores" in capsys.readouterr().err


def test_compare_says_when_the_scorer_or_int8_differ(tmp_path, capsys):
    records = make_records(12, seed=5, split="heldout")
    truth = [render_array(r.scene, 64) for r in records]
    new = _scores_file(tmp_path / "new.json", records, truth, int8=True)
    old = json.loads(new.read_text())
    del old["scorer_version"]                       # written before scores recorded the version
    old["int8"] = False
    (tmp_path / "old.json").write_text(json.dumps(old))
    report = compare_runs(load_scored_run(str(new)), load_scored_run(str(tmp_path / "old.json")), rounds=20)
    assert report["scorer_versions"] == [SCORER_VERSION, 1] and report["sampling_differs_in"] == ["int8"]
    assert main(["compare", str(new), str(tmp_path / "old.json"), "--rounds", "20"]) == 0
    out = capsys.readouterr().out
    assert f"judged by scorer version {SCORER_VERSION} and B by version 1" in out
    assert "different int8" in out
    assert main(["compare", str(new), str(new), "--rounds", "20"]) == 0
    assert "scorer version" not in capsys.readouterr().out
