"""Two scored models side by side, paired image by image: is A better than B beyond noise,
overall and in each category?

A side is either a scores file written by ``l2p eval`` or a toy source folder whose
``training_record.json`` holds the scores ``l2p toy train-source --eval-prompts N`` added
(``"toy"`` names the shipped source). Pairing needs the same prompts in the same order; the
same sampling seeds make it tighter (then a prompt's luck with its noise cancels as well).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2p.toy.scoring import paired_comparison, records_digest
from l2p.toy.world import SPLITS

# The prompt streams ``l2p toy train-source --eval-prompts N`` scores a new source on:
# make_records(N, seed, split) for each split.
SOURCE_EVAL_SEEDS = {"heldout": 1000, "train": 2000}


@dataclass
class ScoredRun:
    """One side of a comparison: what was scored, how, and each image's result."""
    label: str
    correct: np.ndarray          # (n,) bool, in prompt order
    categories: np.ndarray       # (n,) str
    records_digest: str
    sampling: dict               # seed, steps, guidance, ... as recorded
    overall: float
    ci95: tuple[float, float]
    scorer_version: int = 1      # scores that do not record it were judged by version 1


def load_scored_run(where: str, split: str = "heldout") -> ScoredRun:
    """A scores file from ``l2p eval``, or the ``split`` scores in a toy source's training record
    (a folder, or ``"toy"`` for the shipped source)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(where).expanduser()
    if str(where) == "toy" or path.is_dir():
        return _from_training_record(where, split)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such scores file or source folder")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg}); pass a scores file written by l2p eval") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{where} is not a scores file written by l2p eval")
    for key in ("correct", "categories", "records_digest"):
        if key not in summary:
            raise ValueError(f"{where} has no {key!r}: it was not written by this version's l2p eval; "
                             "score the model again with l2p eval")
    sampling = {k: summary.get(k) for k in ("seed", "steps", "guidance", "guidance_max_sigma", "shift",
                                            "noise_device")}
    # True or None (not int8, also in files from before l2p eval had --int8): shown only when set.
    sampling["int8"] = True if summary.get("int8") else None
    return ScoredRun(f"{where} (model {summary.get('model', '?')})", np.asarray(summary["correct"], bool),
                     np.asarray(summary["categories"]), summary["records_digest"], sampling,
                     summary["overall"], tuple(summary["ci95"]), summary.get("scorer_version", 1))


def _from_training_record(where: str, split: str) -> ScoredRun:
    from l2p.data.generate import resolve_source
    from l2p.toy.prompts import make_records

    folder = resolve_source(where)
    record_path = folder / "training_record.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{folder} has no training_record.json; score it with l2p eval and "
                                "compare the scores files")
    evaluation = json.loads(record_path.read_text()).get("eval") or {}
    summary = evaluation.get(split)
    if not isinstance(summary, dict) or "correct" not in summary:
        raise ValueError(f"the training record of {folder} holds no {split} scores; train it with "
                         "--eval-prompts N, or score it with l2p eval and compare the scores files")
    if "records_digest" in summary:
        categories, digest = summary["categories"], summary["records_digest"]
    else:
        # Records written before scores carried their prompts' digest: the prompts are the
        # fixed stream train-source scores on, so rebuild it.
        records = make_records(len(summary["correct"]), SOURCE_EVAL_SEEDS[split], split=split)
        categories, digest = [r.category for r in records], records_digest(records)
        correct = np.asarray(summary["correct"], bool)
        rebuilt = {c: float(correct[np.asarray(categories) == c].mean()) for c in dict.fromkeys(categories)}
        if any(abs(rebuilt[c] - v) > 1e-9 for c, v in summary.get("per_category", {}).items()):
            raise ValueError(f"the {split} scores in the training record of {folder} were not made on "
                             "the prompts train-source scores on today; score the source with l2p "
                             "eval and compare the scores files")
    sampling = {k: evaluation.get(k) for k in ("seed", "steps", "guidance", "noise_device")}
    sampling["int8"] = None   # a latent source has no int8 weights
    return ScoredRun(f"{where} ({split} scores in its training record)", np.asarray(summary["correct"], bool),
                     np.asarray(categories), digest, sampling, summary["overall"], tuple(summary["ci95"]),
                     summary.get("scorer_version", 1))


def compare_runs(a: ScoredRun, b: ScoredRun, *, rounds: int = 2000) -> dict:
    """A minus B, overall and per category, with paired bootstrap intervals. Refuses runs that
    did not judge the same prompts in the same order."""
    if a.correct.shape != b.correct.shape or a.records_digest != b.records_digest:
        raise ValueError(f"{a.label} and {b.label} were scored on different prompts ({a.correct.size} "
                         f"and {b.correct.size} images, prompt digests {a.records_digest[:12]} and "
                         f"{b.records_digest[:12]}); score both on the same prompts file")
    if len(a.categories) != a.correct.size:
        raise ValueError(f"{a.label}: {a.correct.size} results but {len(a.categories)} categories")
    differences = paired_comparison(a.correct, b.correct, a.categories, rounds=rounds)
    differing = sorted(k for k in set(a.sampling) | set(b.sampling) if a.sampling.get(k) != b.sampling.get(k))
    return {
        "a": {"label": a.label, "overall": a.overall, "ci95": a.ci95, "sampling": a.sampling},
        "b": {"label": b.label, "overall": b.overall, "ci95": b.ci95, "sampling": b.sampling},
        "n": int(a.correct.size),
        "per_category_a": {c: float(a.correct[a.categories == c].mean()) for c in differences["per_category"]},
        "per_category_b": {c: float(b.correct[b.categories == c].mean()) for c in differences["per_category"]},
        "difference": differences,
        "sampling_differs_in": differing,
        "scorer_versions": [a.scorer_version, b.scorer_version],
        "rounds": rounds,
    }


def format_comparison(report: dict) -> str:
    """The comparison as a few lines of text: each side, then A - B overall and per category."""
    def side(name, s):
        low, high = s["ci95"]
        how = ", ".join(f"{k} {v}" for k, v in s["sampling"].items() if v is not None)
        return f"{name}: {s['label']}: overall {s['overall']:.3f} ({low:.3f}-{high:.3f}); {how}"

    def row(name, d, a=None, b=None):
        low, high = d["ci95"]
        scores = f"{a:.2f} vs {b:.2f}  " if a is not None else ""
        verdict = "beyond noise" if d["beyond_noise"] else "within noise"
        return f"  {name:<14} {scores}{d['difference']:+.3f} ({low:+.3f} to {high:+.3f})  {verdict}"

    diff = report["difference"]
    lines = [side("A", report["a"]), side("B", report["b"]),
             f"A - B, paired on the same {report['n']} prompts (95% paired bootstrap, {report['rounds']} rounds):",
             row("overall", diff["overall"])]
    lines += [row(c, d, report["per_category_a"][c], report["per_category_b"][c])
              for c, d in diff["per_category"].items()]
    differing = report["sampling_differs_in"]
    if differing:
        # The same seed draws other noise on another kind of device (or an unrecorded one).
        noise = ("seed" in differing or "noise_device" in differing)
        lines.append("note: the two were sampled with different " + ", ".join(differing)
                     + (" (paired by prompt only: an image's noise may differ)" if noise else ""))
    versions = report["scorer_versions"]
    if versions[0] != versions[1]:
        lines.append(f"warning: A was judged by scorer version {versions[0]} and B by version {versions[1]}, "
                     "whose verdicts differ on some images: the difference mixes the models with the "
                     "change in the scorer; score the older one again with l2p eval")
    return "\n".join(lines)


__all__ = ["SOURCE_EVAL_SEEDS", "ScoredRun", "compare_runs", "format_comparison", "load_scored_run"]
