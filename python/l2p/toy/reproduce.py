"""``l2p toy reproduce``: the paper's comparisons at toy scale, side by side in one run.

Every arm trains the same pixel architecture (the toy source converted by ``convert_to_pixel``)
for the same number of optimizer steps at the same batch size, from the default migration's
config (``l2p/train/configs/toy.yaml``) without its alignment term and with the pixel embedding
initialised at random (the paper's recipe), and is scored on the same held-out prompts with the
same sampling seeds:

    l2p            source weights, first/last 2 blocks + embedding + head train, synthetic corpus
    scratch        random init, everything trains, synthetic corpus          (a) transfer
    l2p-real       as l2p, trained on ground-truth renders of the same prompts (b) data
    l2p-first-last-1 / l2p-all   as l2p with n = 1 / every block trainable    (c) depth

and, when asked for (``--arms``), arms beyond the paper:

    l2p-align      as l2p plus the source-feature alignment term (align.weight 0.5, as in the
                   default migration: the hidden states entering the first frozen block pulled
                   towards the source's)
    l2p-align-vae  as l2p-align with the pixel embedding fitted to the source's VAE encoder and
                   latent projection (model.embed_init=vae)
    l2p-verified   as l2p on the verified corpus: the source's generations the scorer accepts
    l2p-default    the default migration's recipe: l2p-align-vae on the verified corpus

Each arm can be trained from several training seeds (``train_seeds``: the data order, noise,
times and the initialisation of new layers); arms trained from the same seed see the same
batches. Differences between arms are paired (same prompts, same sampling seeds, same training
seeds) and carry a bootstrap 95% interval that resamples prompts and training seeds; a
difference is called beyond noise only when its interval excludes zero. Score curves come from
the EMA weights of the checkpoints the first training seed's run writes along the way.

The synthetic corpus is the toy source's own generations for ShapesWorld training prompts; the
real corpus is the ground-truth renders of the very same prompts, so the two differ only in
where the pixels come from; the verified corpus (``l2p.toy.corpus``) keeps, per prompt, the
first of ``verify_candidates`` source generations the scorer accepts: the source's pixels with
its rejected generations replaced by a later try or left out. Every stage resumes: corpora
skip finished images, arms continue from their newest checkpoint, finished evaluations are
read back from disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from l2p.atomic import write_json
from l2p.toy.corpus import (CORPORA, cache_text_embeddings, verification_summary, write_real_corpus,
                             write_synthetic_corpus, write_verified_corpus)
from l2p.toy.prompts import make_records
from l2p.toy.scorer import SCORER_VERSION
from l2p.toy.scoring import paired_difference, score_generated, score_over_seeds
from l2p.toy.source import cpu_name


@dataclass(frozen=True)
class Arm:
    name: str
    init: str          # "source" (L2P) or "random" (from scratch)
    trainable: str     # model.trainable
    data: str          # "synthetic" (the source's generations) or "real" (ground-truth renders)
    description: str
    overrides: tuple[str, ...] = ()  # further trainer settings ("key=value")


# The paper's recipe has no alignment term and a randomly initialised pixel embedding; the toy
# default (toy.yaml) turns the term on and fits the embedding to the source's VAE.
PAPER_RECIPE = ("align.weight=0", "model.embed_init=random")
ARMS = (
    Arm("l2p", "source", "first_last:2", "synthetic",
        "L2P: source weights; embedding, first/last 2 blocks and head train; synthetic corpus",
        PAPER_RECIPE),
    Arm("scratch", "random", "all", "synthetic",
        "same pixel architecture from random init, everything trains; synthetic corpus", PAPER_RECIPE),
    Arm("l2p-real", "source", "first_last:2", "real",
        "as l2p, on ground-truth renders of the same prompts", PAPER_RECIPE),
    Arm("l2p-first-last-1", "source", "first_last:1", "synthetic", "as l2p with n = 1", PAPER_RECIPE),
    Arm("l2p-all", "source", "all", "synthetic", "as l2p with every block trainable", PAPER_RECIPE),
)
# The default migration's recipe (python/l2p/train/configs/toy.yaml) as overrides of an arm.
DEFAULT_RECIPE = ("align.weight=0.5", "model.embed_init=vae")
# Beyond the paper's comparisons: run only when named in ``arms``.
EXTRA_ARMS = (
    Arm("l2p-align", "source", "first_last:2", "synthetic",
        "as l2p plus the source-feature alignment term (align.weight 0.5)",
        ("align.weight=0.5", "model.embed_init=random")),
    Arm("l2p-align-vae", "source", "first_last:2", "synthetic",
        "as l2p-align with the pixel embedding fitted to the source's VAE (model.embed_init=vae)",
        ("align.weight=0.5", "model.embed_init=vae")),
    Arm("l2p-verified", "source", "first_last:2", "verified",
        "as l2p, on the source's generations the scorer accepts (the first of up to "
        "--verify-candidates tries per prompt; prompts with none left out)", PAPER_RECIPE),
    Arm("l2p-default", "source", "first_last:2", "verified",
        "the default migration's recipe: l2p-align-vae on the verified corpus",
        DEFAULT_RECIPE),
    # The paper's comparisons (b) and (c) with the default recipe in place of the paper's.
    Arm("l2p-default-real", "source", "first_last:2", "real",
        "as l2p-default, on ground-truth renders of the same prompts", DEFAULT_RECIPE),
    Arm("l2p-default-first-last-1", "source", "first_last:1", "verified", "as l2p-default with n = 1",
        DEFAULT_RECIPE),
    # With every block trainable there is no frozen block to align at: the term stays at the
    # input of block 2, where l2p-default (n = 2) aligns.
    Arm("l2p-default-all", "source", "all", "verified",
        "as l2p-default with every block trainable (the alignment term at block 2's input)",
        DEFAULT_RECIPE + ("align.block=2",)),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS + EXTRA_ARMS}

# (A, B, question): the report gives score(A) - score(B) with its paired interval.
COMPARISONS = (
    ("l2p", "scratch", "(a) transfer from the source vs the same architecture from scratch"),
    ("l2p", "l2p-real", "(b) source-synthetic corpus vs ground-truth renders"),
    ("l2p", "l2p-first-last-1", "(c) trainable first/last n = 2 vs n = 1"),
    ("l2p", "l2p-all", "(c) trainable first/last n = 2 vs all blocks"),
    ("l2p-align", "l2p", "beyond the paper: with the source-feature alignment term vs without"),
    ("l2p-align-vae", "l2p-align", "beyond the paper: the pixel embedding fitted to the source's VAE vs "
     "randomly initialised (both with the alignment term)"),
    ("l2p-verified", "l2p", "beyond the paper: the source's generations verified by the scorer vs all of them"),
    ("l2p-verified", "l2p-real", "beyond the paper: verified source generations vs ground-truth renders"),
    ("l2p-default", "l2p", "beyond the paper: the default migration's recipe vs the paper's"),
    ("l2p-default", "scratch", "(a) with the default migration's recipe: transfer vs the same architecture "
     "from scratch"),
    ("l2p-default", "l2p-default-real", "(b) with the default migration's recipe: verified source generations "
     "vs ground-truth renders"),
    ("l2p-default", "l2p-default-first-last-1", "(c) with the default migration's recipe: n = 2 vs n = 1"),
    ("l2p-default", "l2p-default-all", "(c) with the default migration's recipe: n = 2 vs all blocks"),
)


@dataclass
class ReproducePlan:
    out_dir: str = "runs/toy-reproduce"
    source: str = "toy"
    # Wall clock for training all arms together; each arm gets the same number of steps, sized
    # so the slowest arm fits its share. Ignored when ``steps`` is given.
    budget_minutes: float = 60.0
    steps: int | None = None
    batch_size: int = 16
    corpus_prompts: int = 600
    corpus_steps: int = 10
    # Tries per prompt for the verified corpus (arms l2p-verified and l2p-default).
    verify_candidates: int = 4
    guidance: float = 4.5
    # Scoring only (the corpus is generated with guidance at every step): guidance only at the
    # steps whose noise level is at most this, for the source and every pixel model alike
    # (L2PPipeline's guidance_max_sigma); None: every step. 0.7, as in the default migration:
    # guided at every step the pixel models draw nothing for prompts like "a circle"
    # (l2p/toy/RESULTS.md, "Guidance at the highest noise levels erased single objects").
    guidance_max_sigma: float | None = 0.7
    # Scoring only: the flow time shift the pixel models sample at (None: their exported
    # scheduler's, the source's 1); the latent source keeps its own. See MigrationPlan.pixel_shift.
    pixel_shift: float | None = 3.0
    eval_prompts: int = 600
    eval_steps: int = 10
    # Score-curve points per arm (checkpoints), each scored on ``curve_prompts`` prompts.
    curve_points: int = 4
    curve_prompts: int = 120
    arms: list[str] = field(default_factory=lambda: [arm.name for arm in ARMS])
    # Prompts, corpus and sampling seed.
    seed: int = 0
    # Each arm trains once per seed here (train.seed and model.init_seed).
    train_seeds: list[int] = field(default_factory=lambda: [0])
    train_overrides: list[str] = field(default_factory=list)

    def validate(self) -> "ReproducePlan":
        unknown = [a for a in self.arms if a not in ARMS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS_BY_NAME)}")
        # Checked before the corpus is rendered (minutes), not when training or scoring reaches them.
        for name in ("batch_size", "corpus_prompts", "corpus_steps", "eval_prompts", "eval_steps",
                     "curve_points", "curve_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < self.curve_points:
            raise ValueError(f"steps ({self.steps}) must be at least curve_points ({self.curve_points})")
        if self.steps is None and self.budget_minutes <= 0:
            raise ValueError("give a positive budget_minutes or a step count")
        if self.guidance_max_sigma is not None and not self.guidance_max_sigma >= 0:
            raise ValueError(f"guidance_max_sigma must be a noise level >= 0, got {self.guidance_max_sigma}")
        if self.pixel_shift is not None and not self.pixel_shift > 0:
            raise ValueError(f"pixel_shift must be a flow time shift > 0, got {self.pixel_shift}")
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError(f"train_seeds must be distinct and at least one, got {self.train_seeds}")
        if self.verify_candidates < 1:
            raise ValueError(f"verify_candidates must be at least 1, got {self.verify_candidates}")
        return self

    @property
    def runs(self) -> int:
        return len(self.arms) * len(self.train_seeds)


# ---------------------------------------------------------------------------------------------
# training


def _arm_config(plan: ReproducePlan, arm: Arm, source_dir: Path, corpus: Path, size: int, steps: int,
                out: Path, extra: list[str] = (), train_seed: int = 0):
    from l2p.train.config import DEFAULT_CONFIG_DIR, load_config

    # Rounded up, so that the last periodic checkpoint is the final one (4000 steps, 3 points:
    # 1334, 2668, 4000; rounded down gave 1333, 2666, 3999 and the final 4000, one point twice).
    every = max(1, -(-steps // plan.curve_points))
    return load_config(DEFAULT_CONFIG_DIR / "toy.yaml", [
        f"model.source={source_dir}", f"model.init={arm.init}", f"model.trainable={arm.trainable}",
        f"model.init_seed={train_seed}", f"data.path={corpus}", f"data.resolution={size}",
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.batch_size={plan.batch_size}",
        f"train.seed={train_seed}", "train.resume=latest", f"checkpoint.every={every}",
        f"checkpoint.keep_last={plan.curve_points + 1}", "sample.every=0", "logging.progress_bar=false",
        *arm.overrides, *plan.train_overrides, *extra,
    ])


def _seconds_per_step(plan: ReproducePlan, source_dir: Path, corpus: Path, size: int, out: Path) -> float:
    """Seconds per optimizer step of the costliest arm of the plan, measured on a short run
    after a warm-up step: scratch (every block trains; l2p-all costs the same) and, when the plan
    has arms with the alignment term, the first of them per trainable-block policy (the source's
    encoder and first blocks run on every batch; arms that train the same blocks with the term
    cost the same, l2p-default-all more than l2p-default)."""
    from l2p.train.config import DEFAULT_CONFIG_DIR, load_config
    from l2p.train.loop import Trainer

    aligned = {}  # trainable policy -> the plan's first arm with the term that trains those blocks
    for name in plan.arms:
        arm = ARMS_BY_NAME[name]
        if load_config(DEFAULT_CONFIG_DIR / "toy.yaml", [*arm.overrides, *plan.train_overrides]).align.weight > 0:
            aligned.setdefault(arm.trainable, name)
    candidates = ["scratch", *aligned.values()]
    slowest = 0.0
    for name in candidates:
        cfg = _arm_config(plan, ARMS_BY_NAME[name], source_dir, corpus, size, 6, out / name,
                          ["train.resume=null", "checkpoint.every=1000000", "logging.tensorboard=false"],
                          train_seed=plan.train_seeds[0])
        cache_text_embeddings(cfg, source_dir)
        trainer = Trainer(cfg)
        trainer.train_step()
        started = time.perf_counter()
        for _ in range(5):
            trainer.train_step()
        slowest = max(slowest, (time.perf_counter() - started) / 5)
    return slowest


def _loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """The denoising loss by step. Arms with the alignment term log it as ``objective_loss``
    (their ``loss`` adds the term), so that every arm's curve measures the same thing."""
    steps, losses = [], []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            loss = record.get("objective_loss", record.get("loss"))
            if loss is not None and not record.get("skipped"):
                steps.append(record["step"])
                losses.append(loss)
    return steps, losses


# ---------------------------------------------------------------------------------------------
# evaluation


def _cached_scores(path: Path, sampling: dict, compute: Callable[[], dict]) -> dict:
    """``_cached`` for scores, which hold the sampling settings they were made with: a rerun
    with other settings must not pass off the old scores as its own."""
    scores = _cached(path, lambda: {**compute(), "sampling": sampling})
    # Settings that scores made before they were recorded used: every step's guidance, the
    # pixel pipeline's own shift.
    made_with = {**sampling, "guidance_max_sigma": None, "pixel_shift": None, **scores.get("sampling", {})}
    if made_with != sampling:
        raise ValueError(f"{path} was scored with sampling {made_with}, this run asks for {sampling}: "
                         f"use a new --out folder or the original settings")
    # Arms keep their summary under "eval", the source's is the scores themselves.
    version = scores.get("eval", scores).get("scorer_version", 1)
    if version != SCORER_VERSION:
        raise ValueError(f"{path} was judged by scorer version {version}, this one is {SCORER_VERSION}, and "
                         "their verdicts differ on some images: delete it to score again, or use a new "
                         "--out folder")
    return scores


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result, indent=1)
    return result


def _score_checkpoints(pipe, run_dir: Path, records, plan: ReproducePlan) -> list[dict]:
    """Score the EMA weights of every checkpoint of ``run_dir`` on ``records``."""
    from safetensors.torch import load_file

    from l2p.toy.scoring import pixel_images
    from l2p.train.checkpoint import list_checkpoints

    prompts = [r.prompt for r in records]
    final_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    points = []
    for ckpt in list_checkpoints(run_dir):
        step = int(ckpt.name.split("-")[1])
        weights = ckpt / "ema.safetensors"
        if not weights.exists():
            weights = ckpt / "trainable.safetensors"
        missing = pipe.transformer.load_state_dict(load_file(str(weights)), strict=False).unexpected_keys
        if missing:
            raise ValueError(f"{weights} holds tensors the pixel model lacks, e.g. {missing[0]}")
        images = pixel_images(pipe, prompts, seed=plan.seed, steps=plan.eval_steps, guidance=plan.guidance,
                              guidance_max_sigma=plan.guidance_max_sigma, shift=plan.pixel_shift)
        summary = score_generated(images, records)
        points.append({"step": step, "overall": summary["overall"], "ci95": summary["ci95"]})
    pipe.transformer.load_state_dict(final_state)
    return points


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in report["arms"].items():
        steps, losses = arm["loss_curve"]
        if losses:
            window = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax_loss.plot(steps[window - 1:], smooth, lw=1, label=name)
        curve = arm["score_curve"]
        ax_score.errorbar([p["step"] for p in curve], [p["overall"] for p in curve],
                          yerr=[[p["overall"] - p["ci95"][0] for p in curve],
                                [p["ci95"][1] - p["overall"] for p in curve]],
                          marker="o", capsize=3, lw=1, label=name)
    if report.get("source"):
        ax_score.axhline(report["source"]["overall"], color="k", ls="--", lw=0.8, label="source (latent)")
    ax_loss.set(xlabel="step", ylabel="denoising loss (smoothed)", yscale="log",
                title="training loss (the alignment term left out)")
    ax_score.set(xlabel="step", ylabel="held-out score", ylim=(0, 1), title="ShapesWorld score (EMA)")
    ax_loss.legend(fontsize=7)
    ax_score.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _markdown(report: dict) -> str:
    plan = report["plan"]
    src = report.get("source")
    cats = list(next(iter(report["arms"].values()))["eval"]["per_category"])
    lines = [
        "# L2P toy reproduction", "",
        f"Machine: {report['machine']}. Each arm: {report['steps']} steps at batch {plan['batch_size']} "
        f"({report['steps_from']}). Corpus: {plan['corpus_prompts']} ShapesWorld training prompts, "
        "one image each" + (
            f" (verified: {report['verification']['kept']} prompts kept an image the scorer accepts, of "
            f"{report['verification']['candidates']} tries each)" if report.get("verification") else "")
        + f". Evaluation: {plan['eval_prompts']} held-out prompts, {plan['eval_steps']} "
        f"sampling steps, guidance {plan['guidance']}"
        + (f" at noise levels up to {plan['guidance_max_sigma']} (the noisier steps unguided)"
           if plan.get("guidance_max_sigma") is not None else "")
        + (f", the pixel models at flow time shift {plan['pixel_shift']:g} (the source at its own)"
           if plan.get("pixel_shift") is not None else "")
        + ", the same sampling seeds for every model. "
        f"Training seeds per arm: {', '.join(map(str, plan['train_seeds']))} (an arm's score is their "
        "mean). Intervals are 95% percentile bootstrap over prompts"
        + (" and training seeds." if len(plan["train_seeds"]) > 1 else "."), "",
        "| model | init | trainable | data | train s | overall | 95% CI | per training seed | % of source | "
        + " | ".join(cats) + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cats),
    ]
    if src:
        lines.append(f"| source (latent) | - | - | - | - | {src['overall']:.3f} | {src['ci95'][0]:.3f}-"
                     f"{src['ci95'][1]:.3f} | - | 100% | "
                     + " | ".join(f"{src['per_category'][c]:.2f}" for c in cats) + " |")
    for name, arm in report["arms"].items():
        e = arm["eval"]
        share = f"{100 * e['overall'] / src['overall']:.0f}%" if src and src["overall"] > 0 else "-"
        seeds = ", ".join(f"{r['overall']:.3f}" for r in arm["per_seed"])
        lines.append(f"| {name} | {arm['init']} | {arm['trainable']} | {arm['data']} | {arm['seconds']:.0f} | "
                     f"{e['overall']:.3f} | {e['ci95'][0]:.3f}-{e['ci95'][1]:.3f} | {seeds} | {share} | "
                     + " | ".join(f"{e['per_category'][c]:.2f}" for c in cats) + " |")
    lines += ["", "## Comparisons (paired: same prompts, same seeds)", "",
              "| question | A | B | A - B | 95% CI | beyond noise |", "|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['question']} | {c['a']} | {c['b']} | {c['difference']:+.3f} | "
                     f"{c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f} | {'yes' if c['beyond_noise'] else 'no'} |")
    lines += ["", "![loss and score curves](curves.png)", ""]
    return "\n".join(lines)


def run_reproduce(plan: ReproducePlan | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every arm, evaluate, and write report.md / report.json / curves.png."""
    from l2p.data.generate import resolve_source
    from l2p.sample.pipeline import L2PPipeline
    from l2p.toy.migration import _image_size
    from l2p.toy.scoring import images_for_prompts
    from l2p.train.loop import train

    plan = (plan or ReproducePlan()).validate()
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source_dir = resolve_source(plan.source)
    size = _image_size(source_dir)
    device = None if torch.cuda.is_available() else "cpu"

    log(f"[1/4] corpora: {plan.corpus_prompts} training prompts, source generations and ground truth")
    corpus_records = make_records(plan.corpus_prompts, plan.seed, split="train")
    corpora = {kind: out / f"corpus-{kind}" for kind in CORPORA}
    needed = {ARMS_BY_NAME[a].data for a in plan.arms}
    generation = dict(size=size, steps=plan.corpus_steps, guidance=plan.guidance, seed=plan.seed, device=device)
    verification = None
    # Always: the step calibration trains on it too.
    write_synthetic_corpus(source_dir, corpus_records, corpora["synthetic"], **generation)
    if "verified" in needed:
        verification = write_verified_corpus(source_dir, corpus_records, corpora["verified"],
                                             candidates=plan.verify_candidates, **generation)
        log(f"      verified corpus: {verification['kept']} of {verification['prompts']} prompts kept an "
            f"image the scorer accepts (of {plan.verify_candidates} tries each)")
    if "real" in needed:
        write_real_corpus(corpus_records, corpora["real"], size)

    if plan.steps is not None:
        steps, steps_from = plan.steps, "fixed by --steps"
    else:
        per_step = _cached(out / "calibration.json", lambda: {"seconds_per_step": _seconds_per_step(
            plan, source_dir, corpora["synthetic"], size, out / ".calibration")})["seconds_per_step"]
        share = plan.budget_minutes * 60 / plan.runs
        steps = max(plan.curve_points, int(share / per_step))
        steps_from = (f"{plan.budget_minutes:g} min budget / {len(plan.arms)} arms x {len(plan.train_seeds)} "
                      f"training seeds at {per_step:.2f} s per step of the costliest arm")
    log(f"[2/4] training {len(plan.arms)} arms x {len(plan.train_seeds)} training seeds for {steps} steps "
        f"each ({steps_from})")
    eval_records = make_records(plan.eval_prompts, plan.seed + 1000, split="heldout")
    curve_records = eval_records[:plan.curve_prompts]
    eval_prompts = [r.prompt for r in eval_records]
    categories = [r.category for r in eval_records]
    sampling = dict(seed=plan.seed, steps=plan.eval_steps, guidance=plan.guidance,
                    guidance_max_sigma=plan.guidance_max_sigma, pixel_shift=plan.pixel_shift)
    pixel_sampling = {**{k: v for k, v in sampling.items() if k != "pixel_shift"}, "shift": plan.pixel_shift}
    arms = {}
    for name in plan.arms:
        arm = ARMS_BY_NAME[name]
        runs = []
        for k, train_seed in enumerate(plan.train_seeds):
            run_dir = out / "arms" / name / f"seed-{train_seed}"
            started = time.time()
            cfg = _arm_config(plan, arm, source_dir, corpora[arm.data], size, steps, run_dir,
                              train_seed=train_seed)
            cache_text_embeddings(cfg, source_dir)
            result = train(cfg)
            seconds = _cached(run_dir / "seconds.json", lambda: {"seconds": time.time() - started})["seconds"]
            with_curve = k == 0  # score curves of the first training seed only
            log(f"      {name} (training seed {train_seed}): trained; scoring "
                f"{plan.curve_points if with_curve else 0} checkpoints and {plan.eval_prompts} held-out prompts")
            pipeline_dir = result.final_dir / "pipeline"

            def evaluate_run():
                from l2p.toy.scoring import pixel_images

                pipe = L2PPipeline.from_pretrained(pipeline_dir)
                summary = score_generated(pixel_images(pipe, eval_prompts, **pixel_sampling), eval_records)
                curve = _score_checkpoints(pipe, run_dir, curve_records, plan) if with_curve else []
                return {"eval": summary, "score_curve": curve}

            scores = _cached_scores(run_dir / "scores.json", sampling, evaluate_run)
            runs.append({"train_seed": train_seed, "steps": result.step, "seconds": seconds, **scores,
                         "loss_curve": _loss_curve(run_dir)})
            log(f"      {name} (training seed {train_seed}): {scores['eval']['overall']:.3f} "
                f"({scores['eval']['ci95'][0]:.3f}-{scores['eval']['ci95'][1]:.3f})")
        correct = [r["eval"]["correct"] for r in runs]
        # One training seed: that run's summary as it is; several: means, and an interval
        # over prompts and seeds.
        evaluation = runs[0]["eval"] if len(runs) == 1 else score_over_seeds(correct, categories)
        arms[name] = {**asdict(arm), "steps": runs[0]["steps"], "seconds": sum(r["seconds"] for r in runs),
                      "eval": evaluation, "correct_by_seed": correct,
                      "per_seed": [{"train_seed": r["train_seed"], "overall": r["eval"]["overall"],
                                    "final_loss": r["loss_curve"][1][-1] if r["loss_curve"][1] else None}
                                   for r in runs],
                      "score_curve": runs[0]["score_curve"], "loss_curve": runs[0]["loss_curve"]}

    log("[3/4] scoring the source on the same prompts")
    source = _cached_scores(out / "source-scores.json", sampling, lambda: score_generated(
        images_for_prompts(source_dir, eval_prompts, **sampling), eval_records))

    log("[4/4] report")
    comparisons = []
    for a, b, question in COMPARISONS:
        if a in arms and b in arms:
            diff = paired_difference(arms[a]["correct_by_seed"], arms[b]["correct_by_seed"], categories)
            comparisons.append({"question": question, "a": a, "b": b, **diff})
    report = {
        "plan": asdict(plan), "source_dir": str(source_dir), "steps": steps, "steps_from": steps_from,
        "machine": (torch.cuda.get_device_name() if torch.cuda.is_available()
                    else f"{cpu_name()}, {torch.get_num_threads()} torch threads"),
        "source": source, "arms": arms, "comparisons": comparisons,
        "verification": verification_summary(verification),
        "pixel_over_source": {n: (a["eval"]["overall"] / source["overall"] if source["overall"] else None)
                              for n, a in arms.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "curves.png")
    (out / "report.md").write_text(_markdown(report))
    log(f"report: {out / 'report.md'}")
    return report

