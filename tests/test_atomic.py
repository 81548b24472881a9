"""l2p.atomic: a file is complete under its final name or absent."""

import json

import pytest

from l2p import atomic


def test_write_lands_whole_and_leaves_no_temporary(tmp_path):
    path = atomic.write_json(tmp_path / "new" / "record.json", {"a": 1}, indent=1)
    assert json.loads(path.read_text()) == {"a": 1}
    atomic.write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp, tmp.open("w") as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.csv"]
    with pytest.raises(TypeError):       # not JSON-serialisable: nothing is written
        atomic.write_json(tmp_path / "bad.json", {"a": object()})
    assert not (tmp_path / "bad.json").exists()
