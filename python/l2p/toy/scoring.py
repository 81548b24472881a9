"""Scoring a generator's images on ShapesWorld prompts, GenEval-style, with confidence
intervals. (The per-image judgement is l2p.toy.scorer's.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from l2p.toy.prompts import PromptRecord
from l2p.toy.scorer import SCORER_VERSION, score_images, summarize
from l2p.toy.world import CATEGORIES, names_heldout


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


def _bootstrap_mean(values, categories, rounds: int, level: float, seed: int):
    """(overall, interval low, high) of ``values`` (seeds x prompts): the mean over categories
    of each category's mean, and a percentile bootstrap that resamples seeds and, within each
    category, prompts. For a paired difference, ``values`` is A - B: the mean is linear, so
    resampling the difference is resampling both models with the same picks."""
    groups = [np.flatnonzero(categories == c) for c in CATEGORIES]
    groups = [g for g in groups if len(g)]
    overall = float(np.mean([values[:, g].mean() for g in groups]))
    rng = np.random.default_rng(seed)
    n_seeds = values.shape[0]
    rounds_out = np.empty(rounds)
    for i in range(rounds):
        rows = rng.choice(n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=np.int64)
        picks = [rng.choice(g, len(g)) for g in groups]
        rounds_out[i] = np.mean([values[np.ix_(rows, p)].mean() for p in picks])
    tail = (1.0 - level) / 2
    return overall, float(np.quantile(rounds_out, tail)), float(np.quantile(rounds_out, 1.0 - tail))


def _by_seed(correct, categories, what: str):
    rows = np.atleast_2d(np.asarray(correct, dtype=np.float64))
    categories = np.asarray(categories)
    if rows.shape[1:] != categories.shape:
        raise ValueError(f"{what} needs one result per prompt (per training seed), in the prompts' order")
    return rows, categories


def paired_difference(correct_a, correct_b, categories, *, rounds: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """Overall score of A minus that of B on the same prompts and sampling seeds, with a paired
    percentile-bootstrap interval.

    ``correct_a`` / ``correct_b``: one result per prompt, or one row of them per training seed
    (seeds x prompts; row k of A and row k of B trained from the same seed). Each round
    resamples the training seeds and, within each category, the prompts, and uses the same
    resample for both models, so prompt difficulty and a seed's luck cancel while the spread
    between seeds widens the interval. ``beyond_noise`` when the interval excludes 0."""
    a, categories = _by_seed(correct_a, categories, "paired_difference")
    b, _ = _by_seed(correct_b, categories, "paired_difference")
    if a.shape != b.shape:
        raise ValueError("paired_difference needs one result per prompt for both models (per training "
                         "seed), in the same order")
    diff, low, high = _bootstrap_mean(a - b, categories, rounds, level, seed)
    return {"difference": diff, "ci95": (low, high), "beyond_noise": bool(low > 0 or high < 0),
            "training_seeds": a.shape[0]}


def paired_comparison(correct_a, correct_b, categories, *, rounds: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """:func:`paired_difference` overall and within each category (that category's accuracy of
    A minus B, resampling its prompts): {"overall": {...}, "per_category": {category: {...}}}."""
    categories = np.asarray(categories)
    a, _ = _by_seed(correct_a, categories, "paired_comparison")
    b, _ = _by_seed(correct_b, categories, "paired_comparison")
    overall = paired_difference(a, b, categories, rounds=rounds, level=level, seed=seed)
    per_category = {}
    for c in CATEGORIES:
        mask = categories == c
        if mask.any():
            per_category[c] = paired_difference(a[:, mask], b[:, mask], categories[mask], rounds=rounds,
                                                level=level, seed=seed)
    return {"overall": overall, "per_category": per_category}


def records_digest(records: list[PromptRecord]) -> str:
    """SHA-256 of the records' content in order: two score files with the same digest judged the
    same scenes in the same order, so their results can be paired image by image."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record.to_dict(), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def score_over_seeds(correct_by_seed, categories, *, rounds: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """One model trained from several seeds, scored on the same prompts (seeds x prompts): the
    mean overall score and per-category accuracies, each seed's overall score, and a bootstrap
    interval that resamples prompts (within categories) and seeds."""
    rows, categories = _by_seed(correct_by_seed, categories, "score_over_seeds")
    overall, low, high = _bootstrap_mean(rows, categories, rounds, level, seed)
    per_category = {c: float(rows[:, categories == c].mean()) for c in CATEGORIES if (categories == c).any()}
    per_seed = [float(np.mean([r[categories == c].mean() for c in per_category])) for r in rows]
    return {"overall": overall, "ci95": (low, high), "per_category": per_category, "per_seed": per_seed}


def score_generated(images, records: list[PromptRecord]) -> dict:
    """Score one image per record; the summary gains ``ci95`` (bootstrap), ``correct`` and
    ``categories`` (per image, in the records' order), ``records_digest`` and
    ``scorer_version`` (what :func:`paired_comparison` users check before pairing two
    summaries) and ``failures`` (the reason for each failed image, first 50)."""
    results, summary = score_images(images, [r.scene for r in records])
    summary["ci95"] = bootstrap_interval(results)
    summary["correct"] = [bool(r.correct) for r in results]
    summary["categories"] = [r.category for r in records]
    summary["records_digest"] = records_digest(records)
    summary["scorer_version"] = SCORER_VERSION
    if any(r.scene.split == "heldout" for r in records):
        # A held-out scene holds a held-out combination, but its prompt need not name it ("a
        # circle" drawn blue): such prompts are ones training gives too. Scored apart, the
        # prompts that do name one measure generalisation to unseen combinations.
        named = [names_heldout(r.scene) for r in records]
        summary["heldout_named"] = {
            kind: summarize([res for res, n in zip(results, named) if n == wanted])
            for kind, wanted in (("novel", True), ("also_in_training", False)) if wanted in named}
    summary["failures"] = [
        {"index": rec.index, "prompt": rec.prompt, "reason": res.reason}
        for rec, res in zip(records, results) if not res.correct
    ][:50]
    return summary


def is_pixel_pipeline(folder: str | Path) -> bool:
    """A folder written by ``l2p convert`` / ``l2p-train``, as opposed to a latent source
    pipeline (``l2p.sample.pipeline.is_pixel_pipeline_folder``)."""
    from l2p.sample.pipeline import is_pixel_pipeline_folder

    return is_pixel_pipeline_folder(folder)


@torch.no_grad()
def images_for_prompts(folder: str | Path, prompts: list[str], *, seed: int = 0,
                       steps: int = 20, guidance: float = 4.5, guidance_max_sigma: float | None = None,
                       pixel_shift: float | None = None, batch_size: int = 32, int8: bool = False) -> np.ndarray:
    """Images of a toy model for ``prompts`` as uint8 (n, H, W, 3), image i seeded with
    ``seed + i``: an L2P pixel pipeline through L2PPipeline, a latent source through its own
    diffusers pipeline; ``guidance_max_sigma`` limits guidance to the steps at most that noisy
    in both; ``pixel_shift`` is the flow time shift a pixel pipeline samples at (None: its
    scheduler's), a latent source keeps its own. ``int8``: a pixel pipeline's blocks with int8
    weights (``L2PPipeline.quantize_int8``)."""
    from l2p.toy.source import generate, load_toy_source

    if not is_pixel_pipeline(folder):
        if int8:
            raise ValueError(f"{folder} is a latent source pipeline; int8 weights are for L2P pixel "
                             "pipelines (l2p convert / l2p-train output)")
        pipe = load_toy_source(folder)
        return generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance,
                        guidance_max_sigma=guidance_max_sigma, batch_size=batch_size)
    from l2p.sample.pipeline import L2PPipeline

    pipe = L2PPipeline.from_pretrained(folder)
    if int8:
        pipe.quantize_int8()
    return pixel_images(pipe, prompts, seed=seed, steps=steps,
                        guidance=guidance, guidance_max_sigma=guidance_max_sigma, shift=pixel_shift,
                        batch_size=batch_size)


@torch.no_grad()
def pixel_images(pipe, prompts: list[str], *, seed: int = 0, steps: int = 20, guidance: float = 4.5,
                 guidance_max_sigma: float | None = None, shift: float | None = None,
                 batch_size: int = 32) -> np.ndarray:
    """Images of a loaded L2PPipeline for ``prompts`` as uint8 (n, H, W, 3), image i seeded
    with ``seed + i``, sampled at flow time shift ``shift`` (None: the pipeline's)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      guidance_max_sigma=guidance_max_sigma, shift=shift, output_type="np").images
        out.append(np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


__all__ = ["bootstrap_interval", "images_for_prompts", "is_pixel_pipeline", "paired_comparison",
           "paired_difference", "pixel_images", "records_digest", "score_generated", "summarize"]
