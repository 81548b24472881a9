"""The embedded default of ``l2p-train``: a complete L2P migration of the toy source.

    toy source (latent PixArt-Sigma) --generate--> synthetic corpus --l2p-train--> pixel model
                                                                  --score--> report

1. the toy source renders its own training corpus from ShapesWorld training prompts, keeping
   per prompt the first of up to four generations the scorer accepts (``MigrationPlan.corpus``);
2. the trainer converts it to pixel space, starts the pixel embedding from the source's VAE
   fitted on the corpus, and trains the embedding, the first/last blocks and the Detailer Head
   with the source-feature alignment term (``l2p/train/configs/toy.yaml``);
3. source and pixel model are scored on held-out prompts with the ShapesWorld scorer;
4. ``report.md`` / ``report.json`` / ``loss.png`` and the trainer's sample grid are written.

Every stage resumes: the corpus skips images already on disk, the trainer continues from its
newest checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from l2p.atomic import write_json
from l2p.toy.corpus import (cache_text_embeddings, verification_summary, write_synthetic_corpus,
                            write_verified_corpus)
from l2p.toy.scoring import images_for_prompts, score_generated
from l2p.toy.prompts import make_records


@dataclass
class MigrationPlan:
    """Sizes of the default run, chosen to finish in about 15 minutes on two CPU cores."""

    out_dir: str = "runs/toy"
    source: str = "toy"
    corpus_prompts: int = 600
    images_per_prompt: int = 1
    # "verified": per prompt the first of ``verify_candidates`` source generations the scorer
    # accepts (l2p.toy.corpus); "synthetic": every generation, as the paper trains. This toy
    # source gets about half of its training prompts wrong; measured (l2p/toy/RESULTS.md, 1500
    # steps, three training seeds, 240 held-out prompts): 0.196 on the verified corpus against
    # 0.125 on all generations, paired +0.071 (+0.035 to +0.106).
    corpus: str = "verified"
    verify_candidates: int = 4
    corpus_steps: int = 10
    guidance: float = 4.5
    # Scoring (source and pixel model alike; the corpus is generated guiding every step):
    # guidance only at noise levels up to this (L2PPipeline's guidance_max_sigma). Guided at
    # every step, the toy pixel model draws nothing for prompts like "a circle"; measured
    # (l2p/toy/RESULTS.md, 240 held-out prompts, 4000-step alignment model): 0.371 against 0.267,
    # paired +0.104 (+0.046 to +0.158), its source 0.471 against 0.429. None: every step.
    guidance_max_sigma: float | None = 0.7
    # Scoring: the flow time shift the pixel model samples at (None: its exported scheduler's,
    # the source's 1); the source keeps its own. At the same sigma a noisy 64x64x3 image shows
    # more of its layout than the source's noisy 16x16x4 latent (12x the values, strongly
    # correlated), so the pixel model wants more of its steps at high noise (SD3's resolution
    # rule, shift sqrt(12) = 3.5). Chosen on other held-out prompts than the scored ones
    # (l2p/toy/RESULTS.md, "Sampling the pixel model at a higher time shift").
    pixel_shift: float | None = 3.0
    eval_prompts: int = 120
    eval_steps: int = 10
    seed: int = 0
    # Extra ``--set`` overrides for the trainer's toy config.
    train_overrides: list[str] = field(default_factory=list)


def _image_size(source_dir: Path) -> int:
    index = json.loads((source_dir / "transformer" / "config.json").read_text())
    vae = json.loads((source_dir / "vae" / "config.json").read_text())
    return int(index["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _plot_loss(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            steps.append(record["step"])
            losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("L2P toy migration")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _report_markdown(report: dict) -> str:
    src, pix = report["source"], report["pixel"]
    lines = [
        "# L2P toy migration", "",
        f"Source: `{report['source_dir']}`; {report['corpus']} corpus of {report['corpus_images']} images; "
        f"trained {report['train_steps']} steps; {report['seconds']:.0f} s on {report['machine']}.",
        "",
    ]
    if report.get("verification"):
        v = report["verification"]
        lines += [f"Verified corpus: {v['kept']} of {v['prompts']} prompts kept an image the scorer accepts "
                  f"(of {v['candidates']} tries each; the first try passed for {v['first_try_accepted']:.0%}). "
                  "Kept by category: " + ", ".join(f"{c} {f:.0%}" for c, f in v["kept_by_category"].items())
                  + ".", ""]
    lines += [
        f"Held-out prompts: {report['eval_prompts']} ({report['eval_steps']} sampling steps, "
        f"guidance {report['guidance']}"
        + (f" at noise levels up to {report['guidance_max_sigma']}, the noisier steps unguided"
           if report.get("guidance_max_sigma") is not None else "")
        + (f"; the pixel model at flow time shift {report['pixel_shift']:g}, the source at its own"
           if report.get("pixel_shift") is not None else "")
        + "). 95% intervals are bootstrap over images.", "",
        "| model | overall | 95% CI | " + " | ".join(src["per_category"]) + " |",
        "|---|---|---|" + "---|" * len(src["per_category"]),
    ]
    for name, s in (("source (latent)", src), ("L2P pixel model", pix)):
        cats = " | ".join(f"{s['per_category'].get(c, float('nan')):.2f}" for c in src["per_category"])
        lines.append(f"| {name} | {s['overall']:.3f} | {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f} | {cats} |")
    named_src, named_pix = src.get("heldout_named", {}), pix.get("heldout_named", {})
    if named_src and named_pix:
        lines.append("")
    for kind, what in (("novel", "that name a held-out combination (prompts training never gives)"),
                       ("also_in_training", "that name none (training gives them too)")):
        if kind in named_src and kind in named_pix:
            lines.append(f"- The {named_src[kind]['n']} held-out prompts {what}: source "
                         f"{named_src[kind]['overall']:.3f}, pixel {named_pix[kind]['overall']:.3f}.")
    ratio = report["pixel_over_source"]
    lines += ["", f"Pixel / source overall: {ratio:.2f}" if ratio is not None else
              "Pixel / source overall: undefined (the source scored 0)", "",
              "![loss](loss.png)", "", "Sample grid: `train/samples/final.png` (at the trained shift)."]
    if report.get("pixel_shift") is not None:
        interval = (f" --guidance-max-sigma {report['guidance_max_sigma']:g}"
                    if report.get("guidance_max_sigma") is not None else "")
        model = Path(report["plan"]["out_dir"]) / "train" / "final" / "pipeline"
        lines += ["", f"Sample the pixel model as it was scored: `l2p sample --model {model} --shift "
                  f"{report['pixel_shift']:g}{interval} --guidance {report['guidance']:g} --steps "
                  f"{report['eval_steps']} --prompt \"two red circles\"`."]
    return "\n".join(lines) + "\n"


_CORPUS_SETTINGS = ("source", "corpus_prompts", "images_per_prompt", "corpus", "verify_candidates",
                    "corpus_steps", "guidance", "seed")


def _check_same_plan(out: Path, plan: MigrationPlan) -> None:
    """A rerun resumes the run in ``out``; refuse to resume one whose corpus was made with other
    settings (the model trained on it would not be the one this plan describes). Trainer
    overrides and scoring settings may change between runs (``--set train.max_steps=...``
    continues a finished run)."""
    record = out / "plan.json"
    current = {k: v for k, v in asdict(plan).items() if k in _CORPUS_SETTINGS}
    if record.exists():
        before = json.loads(record.read_text())
        changed = sorted(k for k in current if before.get(k) != current[k])
        if changed:
            raise ValueError(f"{out} holds a toy migration made with other settings ({', '.join(changed)}); "
                             "delete it or choose another output folder")
        return
    if (out / "train").exists():
        raise ValueError(f"{out} holds a toy migration from an earlier version of l2p (no plan.json); "
                         "delete it or choose another output folder")
    write_json(record, current, indent=1)


def run_toy_migration(plan: MigrationPlan | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole migration; returns the report dictionary."""
    from l2p.data.generate import resolve_source
    from l2p.train.config import DEFAULT_CONFIG_DIR, load_config
    from l2p.train.loop import train

    plan = plan or MigrationPlan()
    if plan.corpus not in ("synthetic", "verified"):
        raise ValueError(f"corpus must be 'synthetic' or 'verified', got {plan.corpus!r}")
    started = time.time()
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_plan(out, plan)
    source_dir = resolve_source(plan.source)
    size = _image_size(source_dir)

    records = make_records(plan.corpus_prompts, plan.seed, split="train")
    generation = dict(size=size, steps=plan.corpus_steps, guidance=plan.guidance, seed=plan.seed,
                      device=None if torch.cuda.is_available() else "cpu")
    verification = None
    if plan.corpus == "verified":
        log(f"[1/4] corpus: the source's generations for {plan.corpus_prompts} ShapesWorld prompts that "
            f"the scorer accepts (up to {plan.verify_candidates} tries each)")
        corpus = out / "corpus-verified"
        verification = write_verified_corpus(source_dir, records, corpus,
                                             candidates=plan.verify_candidates, **generation)
        corpus_images = verification["images"]
        log(f"      {verification['kept']} of {len(records)} prompts kept an image")
    else:
        log(f"[1/4] corpus: {plan.corpus_prompts} ShapesWorld prompts rendered by the source")
        corpus = write_synthetic_corpus(source_dir, records, out / "corpus",
                                        images_per_prompt=plan.images_per_prompt, **generation)
        corpus_images = plan.corpus_prompts * plan.images_per_prompt

    log("[2/4] training the pixel model (l2p/train/configs/toy.yaml)")
    cfg = load_config(DEFAULT_CONFIG_DIR / "toy.yaml", [
        f"model.source={source_dir}", f"data.path={corpus}", f"data.resolution={size}",
        f"train.output_dir={out / 'train'}", "train.resume=latest", *plan.train_overrides,
    ])
    cache_text_embeddings(cfg, source_dir)
    result = train(cfg)

    log(f"[3/4] scoring source and pixel model on {plan.eval_prompts} held-out prompts")
    records = make_records(plan.eval_prompts, plan.seed + 1000, split="heldout")
    prompts = [r.prompt for r in records]
    sampling = dict(seed=plan.seed, steps=plan.eval_steps, guidance=plan.guidance,
                    guidance_max_sigma=plan.guidance_max_sigma)
    source_images = images_for_prompts(source_dir, prompts, **sampling)
    pixel_images = images_for_prompts(result.final_dir / "pipeline", prompts, **sampling,
                                      pixel_shift=plan.pixel_shift)
    source_score = score_generated(source_images, records)
    pixel_score = score_generated(pixel_images, records)

    log("[4/4] report")
    metrics = out / "train" / "metrics.jsonl"
    if metrics.exists():
        _plot_loss(metrics, out / "loss.png")
    report = {
        "plan": asdict(plan),
        "source_dir": str(source_dir),
        "corpus": plan.corpus,
        "corpus_images": corpus_images,
        "verification": verification_summary(verification),
        "train_steps": result.step,
        "eval_prompts": plan.eval_prompts,
        "eval_steps": plan.eval_steps,
        "guidance": plan.guidance,
        "guidance_max_sigma": plan.guidance_max_sigma,
        "pixel_shift": plan.pixel_shift,
        "source": source_score,
        "pixel": pixel_score,
        "pixel_over_source": (pixel_score["overall"] / source_score["overall"]
                              if source_score["overall"] > 0 else None),
        "seconds": time.time() - started,
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_report_markdown(report))
    log(f"source {source_score['overall']:.3f}, pixel {pixel_score['overall']:.3f}; "
        f"report in {out / 'report.md'}")
    return report
