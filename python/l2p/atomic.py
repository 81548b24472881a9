"""Files that are complete or absent.

Every file l2p writes lands under its final name with one ``os.replace``, so an interrupted
run never leaves a half-written file there, and a resumed job can trust every file it finds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to. Leaving the block normally moves it onto
    ``path`` (making the parent folder first); leaving it by an exception removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id keeps two processes writing the same file (ranks, workers) off each
    # other's temporary; the leading dot keeps it out of globs for the final names.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj, **dumps_options) -> Path:
    """Write ``json.dumps(obj, **dumps_options)`` to ``path`` atomically."""
    return write_text(path, json.dumps(obj, **dumps_options))


__all__ = ["atomic_path", "write_json", "write_text"]
