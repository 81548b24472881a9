"""Scoring a generator's images on ShapesWorld prompts, GenEval-style, with confidence
intervals. (The per-image judgement is l2p.toy.scorer's.)"""

from __future__ import annotations

import numpy as np

from l2p.toy.prompts import PromptRecord
from l2p.toy.scorer import score_images, summarize
from l2p.toy.world import CATEGORIES


def bootstrap_interval(results, *, rounds: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap of the overall score (mean of per-category accuracies),
    resampling images within each category so every round keeps the category mix."""
    rng = np.random.default_rng(seed)
    by_category = [np.array([r.correct for r in results if r.category == c], dtype=np.float64)
                   for c in CATEGORIES]
    by_category = [hits for hits in by_category if len(hits)]
    overall = np.empty(rounds)
    for i in range(rounds):
        overall[i] = np.mean([rng.choice(hits, len(hits)).mean() for hits in by_category])
    tail = (1.0 - level) / 2
    return float(np.quantile(overall, tail)), float(np.quantile(overall, 1.0 - tail))


def score_generated(images, records: list[PromptRecord]) -> dict:
    """Score one image per record; the summary gains ``ci95`` (bootstrap) and ``failures``
    (the reason for each failed image, first 50)."""
    results, summary = score_images(images, [r.scene for r in records])
    summary["ci95"] = bootstrap_interval(results)
    summary["failures"] = [
        {"index": rec.index, "prompt": rec.prompt, "reason": res.reason}
        for rec, res in zip(records, results) if not res.correct
    ][:50]
    return summary


__all__ = ["bootstrap_interval", "score_generated", "summarize"]
