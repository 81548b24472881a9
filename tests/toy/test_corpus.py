"""The toy corpora: the verified corpus keeps, per prompt, the first generation the scorer
accepts, records what it kept, resumes without rescoring, and refuses to be empty."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from l2p.toy import corpus as toy_corpus
from l2p.toy import scorer, source
from l2p.toy.prompts import make_records

from _tiny_source import TINY


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy-source") / "source"
    source.train_toy_source(TINY, folder, "cpu", log=lambda _: None)
    return folder


def _verdicts_by_rule(rule, records):
    """A stand-in for the scorer that accepts try i of prompt p when ``rule(p, i)``: call k of
    write_verified_corpus scores try k of the prompts still without an accepted image."""
    index = {id(r.scene): p for p, r in enumerate(records)}
    calls = []

    def score_images(images, scenes, world=None):
        attempt = len(calls)
        calls.append([index[id(s)] for s in scenes])
        return [scorer.ImageScore("", "", rule(index[id(s)], attempt), "") for s in scenes], {}
    score_images.calls = calls
    return score_images


def test_verified_corpus_keeps_the_first_accepted_try(tiny_source, tmp_path, monkeypatch):
    records = make_records(6, 0, split="train")
    # Prompt 0: tries 1 and 2 pass -> keeps 1; prompt 1: none -> left out; the rest: try 0.
    accepted = {(0, 1), (0, 2)} | {(p, 0) for p in range(2, 6)}
    stand_in = _verdicts_by_rule(lambda p, i: (p, i) in accepted, records)
    monkeypatch.setattr(scorer, "score_images", stand_in)
    out = tmp_path / "corpus-verified"
    kw = dict(size=32, steps=2, guidance=4.5, seed=0, candidates=3, device="cpu")
    result = toy_corpus.write_verified_corpus(tiny_source, records, out, **kw)

    assert result["prompts"] == 6 and result["kept"] == 5 and result["images"] == 5
    assert result["kept_fraction"] == pytest.approx(5 / 6)
    assert result["first_try_accepted"] == pytest.approx(4 / 6)
    # Round k renders and scores try k only for the prompts still without an accepted image.
    assert stand_in.calls == [[0, 1, 2, 3, 4, 5], [0, 1], [1]]
    assert result["verdicts"][0] == [0, 1, -1] and result["verdicts"][1] == [0, 0, 0]
    assert result["generated"] == 9
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    kept = {int(r["prompt_index"]): int(r["image_index"]) for r in rows}
    assert kept == {0: 1, 2: 0, 3: 0, 4: 0, 5: 0}
    pool = tmp_path / "corpus-verified-candidates"
    for r in rows:  # each kept image is the candidate it names, with its prompt's text
        assert r["text"] == records[int(r["prompt_index"])].prompt
        assert (out / r["file_name"]).read_bytes() == (pool / r["file_name"]).read_bytes()
    assert len(list(pool.rglob("*.png"))) == 9
    assert json.loads((out / "verification.json").read_text())["kept"] == 5

    # Rerun: read back from disk, nothing scored again.
    def refuse(*_, **__):
        raise AssertionError("rescored on resume")
    monkeypatch.setattr(scorer, "score_images", refuse)
    assert toy_corpus.write_verified_corpus(tiny_source, records, out, **kw)["kept"] == 5
    # Other prompts or another number of tries in the same folder: refused, not mixed.
    with pytest.raises(ValueError, match="other prompts or another number of tries"):
        toy_corpus.write_verified_corpus(tiny_source, records, out, **{**kw, "candidates": 2})
    with pytest.raises(ValueError, match="other prompts"):
        toy_corpus.write_verified_corpus(tiny_source, make_records(6, 1, split="train"), out, **kw)


def test_an_empty_verified_corpus_is_refused(tiny_source, tmp_path, monkeypatch):
    records = make_records(3, 0, split="train")
    monkeypatch.setattr(scorer, "score_images", _verdicts_by_rule(lambda p, i: False, records))
    with pytest.raises(ValueError, match="accepted none .* more tries"):
        toy_corpus.write_verified_corpus(tiny_source, records, tmp_path / "v",
                                         size=32, steps=2, guidance=4.5, seed=0, candidates=2, device="cpu")
    with pytest.raises(ValueError, match="at least 1"):
        toy_corpus.write_verified_corpus(tiny_source, [], tmp_path / "w", size=32, steps=2, guidance=4.5,
                                         seed=0, candidates=0)


def test_with_the_real_scorer_the_corpus_holds_exactly_the_first_accepted_tries(tiny_source, tmp_path):
    """The real scorer on the tiny (untrained) source's tries, with the second try of every
    other prompt replaced by its ground-truth render: the corpus holds, per prompt, the first
    try the scorer accepts when asked on its own, and nothing for the rest."""
    from PIL import PngImagePlugin

    from l2p.data.generate import image_name
    from l2p.toy.render import render

    records = make_records(8, 0, split="train")
    out, pool = tmp_path / "corpus-verified", tmp_path / "corpus-verified-candidates"
    kw = dict(size=64, steps=2, guidance=4.5, seed=0, candidates=2, device="cpu")
    toy_corpus.write_synthetic_corpus(tiny_source, records, pool, images_per_prompt=2, **{
        k: v for k, v in kw.items() if k != "candidates"})
    for p in range(0, len(records), 2):
        path = pool / image_name(p, 1)
        with Image.open(path) as im:
            info = PngImagePlugin.PngInfo()
            info.add_itxt("l2p", im.info["l2p"])  # the generation record the metadata is built from
        render(records[p].scene, 64).save(path, format="PNG", pnginfo=info)

    def accepted(p, i):
        image = np.asarray(Image.open(pool / image_name(p, i)).convert("RGB"))
        return scorer.score_image(image, records[p].scene).correct

    expected = {p: next(i for i in range(2) if accepted(p, i)) for p in range(len(records))
                if accepted(p, 0) or accepted(p, 1)}
    assert len(expected) >= len(records) // 2  # the renders pass
    result = toy_corpus.write_verified_corpus(tiny_source, records, out, **kw)
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert {int(r["prompt_index"]): int(r["image_index"]) for r in rows} == expected
    assert result["kept"] == len(expected)


def test_real_corpus_renders_the_prompts(tmp_path):
    records = make_records(4, 0, split="train")
    out = toy_corpus.write_real_corpus(records, tmp_path / "real", 64)
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert [r["text"] for r in rows] == [r.prompt for r in records]
    images = [np.asarray(Image.open(out / r["file_name"]).convert("RGB")) for r in rows]
    results, _ = scorer.score_images(images, [r.scene for r in records])
    assert all(v.correct for v in results)
