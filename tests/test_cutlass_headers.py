"""Where the build finds the CUTLASS headers (cmake/cutlass_headers.py): $CUTLASS_INCLUDE first,
then the fetched build/cutlass/include, then an installed nvidia-cutlass; a folder without the
headers is passed over."""

from __future__ import annotations

from pathlib import Path

import cutlass_headers  # cmake/, on the path through conftest.py


def _fake_include(folder: Path) -> Path:
    (folder / "cutlass").mkdir(parents=True)
    (folder / "cute").mkdir()
    (folder / "cutlass" / "cutlass.h").write_text("")
    (folder / "cute" / "tensor.hpp").write_text("")
    return folder


def test_lookup_order(tmp_path, monkeypatch):
    fetched = _fake_include(tmp_path / "fetched")
    explicit = _fake_include(tmp_path / "explicit")
    monkeypatch.setattr(cutlass_headers, "FETCHED", fetched)
    monkeypatch.setenv("CUTLASS_INCLUDE", str(explicit))
    assert cutlass_headers.find() == explicit
    monkeypatch.setenv("CUTLASS_INCLUDE", str(tmp_path / "empty"))  # no headers there: skipped
    assert cutlass_headers.find() == fetched
    monkeypatch.delenv("CUTLASS_INCLUDE")
    monkeypatch.setattr(cutlass_headers, "FETCHED", tmp_path / "missing")
    monkeypatch.setattr(cutlass_headers.importlib.util, "find_spec", lambda name: None)
    assert cutlass_headers.find() is None
