"""Reads the text-embedding cache of ``l2p data embed`` so training never loads a text encoder.

The cache belongs to the data package; this is the trainer's narrow view of it: a callable
``captions -> conditioning dict`` (the same tensor names ``conditioning.Family.encode`` returns)
that also answers the empty caption (caption dropout, CFG).
"""

from __future__ import annotations

from pathlib import Path


def open_embedding_cache(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"text-embedding cache {str(path)!r} does not exist; run "
                                "`l2p data embed --source SRC --data DATA` or set data.embeddings=null")
    from l2p.data.embed import EmbeddingCache

    cache = EmbeddingCache(path)
    if "" not in cache:
        raise ValueError(f"{path} lacks the empty caption that caption dropout needs; re-run `l2p data embed`")
    return cache
