"""Prompt files: what is written is read back exactly, and bad files say what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2p.toy import CATEGORIES, make_records, read_prompts, render_array, write_prompts
from l2p.toy.prompts import FORMAT


def test_round_trip_keeps_scenes_and_pixels(tmp_path):
    path = tmp_path / "eval" / "prompts.jsonl"
    written = write_prompts(path, 24, seed=5, split="heldout")
    read = read_prompts(path)
    assert read == written
    assert [r.index for r in read] == list(range(24))
    assert {r.category for r in read} == set(CATEGORIES) and {r.split for r in read} == {"heldout"}
    for a, b in zip(written, read):
        assert np.array_equal(render_array(a.scene), render_array(b.scene))
    assert make_records(24, seed=5, split="heldout") == written


def test_the_file_is_plain_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    write_prompts(path, 6, seed=1, split="train", categories=["counting", "position"])
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    assert first["format"] == FORMAT and first["seed"] == 1 and first["split"] == "train"
    assert first["category"] == "counting" and first["prompt"].split()[0] in {"two", "three", "four"}
    assert set(first["scene"]) == {"category", "groups", "objects", "background", "relation", "split"}


def test_same_seed_same_file(tmp_path):
    write_prompts(tmp_path / "a.jsonl", 12, seed=8)
    write_prompts(tmp_path / "b.jsonl", 12, seed=8)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: "{not json", "not JSON"),
    (lambda d: json.dumps({**d, "format": "other"}), "not a shapesworld-v1 record"),
    (lambda d: json.dumps({**d, "prompt": "a purple cow"}), "does not match its scene"),
    (lambda d: json.dumps({**d, "scene": {**d["scene"], "category": "shapes"}}), "unknown category"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "scene"}), "malformed record"),
])
def test_bad_lines_are_reported_with_their_line_number(tmp_path, mutate, message):
    path = tmp_path / "p.jsonl"
    write_prompts(path, 3, seed=2)
    lines = path.read_text().splitlines()
    lines[1] = mutate(json.loads(lines[1]))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"p.jsonl:2: .*{message}"):
        read_prompts(path)


def test_missing_or_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_prompts"):
        read_prompts(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="positive integer"):
        write_prompts(tmp_path / "none.jsonl", 0, seed=1)
