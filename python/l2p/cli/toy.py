"""``l2p toy ...``: the ShapesWorld toy world's commands."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

import torch

from l2p.devices import pick_device as _pick_device


def run_train_source(args: argparse.Namespace) -> int:
    from l2p.toy.source import SHIPPED_SOURCE_DIR, ToySourceConfig, train_toy_source

    overrides = {}
    for f in fields(ToySourceConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = value
    for name in ("init_from", "vae_from"):  # 'toy': the shipped source, as for every --source
        if overrides.get(name) == "toy":
            overrides[name] = str(SHIPPED_SOURCE_DIR)
    cfg = ToySourceConfig(**overrides).validate()
    if args.eval_prompts < 0 or args.threads < 0:
        raise ValueError(f"--eval-prompts and --threads must be >= 0, got {args.eval_prompts} and {args.threads}")
    out = args.out or SHIPPED_SOURCE_DIR
    command = "l2p " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _pick_device(args.device)
    train_toy_source(cfg, out, device, command=command)
    if args.eval_prompts:
        _evaluate_source(out, device, args.eval_prompts)
    return 0


def _evaluate_source(folder, device, n: int) -> None:
    """Score the new source on ``n`` held-out and ``n`` training-split prompts and add the
    result to its training record."""
    import json
    from pathlib import Path

    from l2p.atomic import write_json
    from l2p.toy.comparison import SOURCE_EVAL_SEEDS
    from l2p.toy.prompts import make_records
    from l2p.toy.scoring import score_generated
    from l2p.toy.source import generate, load_toy_source

    pipe = load_toy_source(folder, device)
    record_path = Path(folder) / "training_record.json"
    record = json.loads(record_path.read_text())
    record["eval"] = {"steps": 20, "guidance": 4.5, "seed": 0, "noise_device": device.type}
    for split, seed in SOURCE_EVAL_SEEDS.items():
        records = make_records(n, seed, split=split)
        images = generate(pipe, [r.prompt for r in records], seed=0, steps=20, guidance=4.5,
                          batch_size=256 if device.type == "cuda" else 32)
        summary = score_generated(images, records)
        record["eval"][split] = summary
        print(f"toy source on {n} {split} prompts: overall {summary['overall']:.3f} "
              f"(95% CI {summary['ci95'][0]:.3f}-{summary['ci95'][1]:.3f}) "
              + " ".join(f"{k}={v:.2f}" for k, v in summary["per_category"].items()))
    write_json(record_path, record, indent=2)


def _float_or_none(text: str, what: str = "a number (like 3)") -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} or 'none', got {text!r}") from None


def _noise_level_or_none(text: str) -> float | None:
    return _float_or_none(text, "a noise level (like 0.7)")


def _number_list(text: str, kind: type, flag: str, example: str) -> list:
    """A comma-separated flag value as numbers of ``kind``; a bad one is a ValueError naming the flag."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated {kind.__name__}s, e.g. {example}; got {text!r}") from None


def run_prompts(args: argparse.Namespace) -> int:
    from l2p.toy.prompts import write_prompts
    from l2p.toy.world import CATEGORIES

    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"--categories takes some of {', '.join(CATEGORIES)}; got {args.categories!r}")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    records = write_prompts(args.out, args.num, args.seed, split=args.split, categories=tuple(categories))
    print(f"wrote {len(records)} {args.split} prompts to {args.out}")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    from l2p.toy.reproduce import ReproducePlan, run_reproduce as reproduce

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        plan = ReproducePlan(
            out_dir=args.out, source=args.source, budget_minutes=args.budget_minutes, steps=args.steps,
            batch_size=args.batch_size, corpus_prompts=args.corpus_prompts,
            verify_candidates=args.verify_candidates, eval_prompts=args.eval_prompts,
            curve_points=args.curve_points, curve_prompts=args.curve_prompts, seed=args.seed,
            guidance_max_sigma=args.guidance_max_sigma, pixel_shift=args.pixel_shift,
            train_seeds=_number_list(args.train_seeds, int, "--train-seeds", "0,1,2"), train_overrides=list(args.set),
            **({"arms": args.arms.split(",")} if args.arms else {}),
        ).validate()
    except ValueError as err:
        print(f"l2p toy reproduce: {err}", file=sys.stderr)
        return 2
    reproduce(plan)
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    from l2p.toy.diagnose import DiagnosePlan, run_diagnose as diagnose, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        plan = DiagnosePlan(
            model=args.model, source=args.source, prompts=args.prompts, steps=args.steps,
            guidance=args.guidance, seed=args.seed,
            handoff_sigmas=_number_list(args.handoff_sigmas, float, "--handoff-sigmas", "0.5,0.9"),
            probe_sigmas=_number_list(args.probe_sigmas, float, "--probe-sigmas", "0.5,0.9"),
        ).validate()
    except ValueError as err:
        print(f"l2p toy diagnose: {err}", file=sys.stderr)
        return 2
    report = diagnose(plan)
    print(f"report: {write_report(report, args.out)}")
    return 0


def register(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="the ShapesWorld toy world")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    toy_sub.required = True

    p = toy_sub.add_parser(
        "train-source",
        help="train the toy source model (a PixArt-Sigma pipeline) on ShapesWorld",
        description="Render ShapesWorld, train the autoencoder, then the transformer and text "
                    "encoder with flow matching; write a diffusers pipeline folder.",
    )
    p.add_argument("--out", help="output pipeline folder (default: the package's shipped toy source)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--eval-prompts", type=int, default=0, metavar="N",
                   help="afterwards, score the model on N held-out and N training-split prompts")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default: torch's choice). On a CPU shared with "
                        "other work, 1 avoids the threads waiting on each other")
    p.add_argument("--init-from", dest="init_from", metavar="FOLDER",
                   help="continue training this toy source folder ('toy': the shipped one; same "
                        "architecture, its autoencoder kept) instead of starting from random weights")
    p.add_argument("--vae-from", dest="vae_from", metavar="FOLDER",
                   help="take the trained autoencoder of this toy source folder ('toy': the shipped "
                        "one) and train a new transformer and text encoder from random weights (the "
                        "transformer and text-encoder sizes may differ from the folder's)")
    from l2p.toy.source import ToySourceConfig

    for f in fields(ToySourceConfig):
        if f.type in ("int", "float"):
            flag = "--" + f.name.replace("_", "-")
            p.add_argument(flag, dest=f.name, type=int if f.type == "int" else float,
                           help=f"default {f.default}")
    from l2p.toy.text_encoder import OBJECTIVES

    p.add_argument("--text-pretrain-objective", dest="text_pretrain_objective", choices=OBJECTIVES,
                   help="what --text-pretrain-steps trains the text encoder on: 'denoise' "
                        "(reconstruct corrupted prompts), 'context' (each word's output predicts "
                        "the --text-context-window words on either side of it) or 'preceding' "
                        "(the words before it only); default denoise")
    p.set_defaults(func=run_train_source)

    from l2p.toy.reproduce import ARMS, EXTRA_ARMS, ReproducePlan

    d = ReproducePlan()
    r = toy_sub.add_parser(
        "reproduce",
        help="the paper's comparisons at toy scale: L2P vs scratch, synthetic vs real, n blocks",
        description="Train every arm for the same steps on the toy source's corpus (or ground-truth "
                    "renders), score all on the same held-out prompts and seeds, and write "
                    "report.md/json and curves.png with paired 95% intervals. Arms: "
                    + "; ".join(f"{a.name}: {a.description}" for a in ARMS)
                    + ". Beyond the paper, run only when named in --arms: "
                    + "; ".join(f"{a.name}: {a.description}" for a in EXTRA_ARMS),
    )
    r.add_argument("--out", default=d.out_dir, help=f"run folder (default {d.out_dir}); rerun to resume")
    r.add_argument("--source", default=d.source, help="toy source folder (default: the shipped one)")
    r.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                   help=f"training wall clock for all arms together (default {d.budget_minutes:g})")
    r.add_argument("--steps", type=int, help="steps per arm (overrides --budget-minutes)")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--arms", help="comma-separated arms (default: the paper's, "
                   + ",".join(a.name for a in ARMS) + "; also " + ",".join(a.name for a in EXTRA_ARMS) + ")")
    r.add_argument("--corpus-prompts", type=int, default=d.corpus_prompts)
    r.add_argument("--verify-candidates", type=int, default=d.verify_candidates, metavar="K",
                   help="source generations tried per prompt for the verified corpus of the arms "
                        "l2p-verified and l2p-default (default %(default)s)")
    r.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    r.add_argument("--guidance-max-sigma", type=_noise_level_or_none, default=d.guidance_max_sigma,
                   help="score with guidance only at noise levels up to this, the source and every arm "
                        "alike; 'none' guides every step (default %(default)s)")
    r.add_argument("--pixel-shift", type=_float_or_none, default=d.pixel_shift,
                   help="flow time shift the pixel models sample at when scored (the source keeps "
                        "its own); 'none': their exported scheduler's (default %(default)s)")
    r.add_argument("--curve-points", type=int, default=d.curve_points)
    r.add_argument("--curve-prompts", type=int, default=d.curve_prompts)
    r.add_argument("--seed", type=int, default=d.seed, help="prompts, corpus and sampling seed")
    r.add_argument("--train-seeds", default=",".join(map(str, d.train_seeds)), metavar="S1,S2,...",
                   help="train every arm once per seed (data order, noise, new-layer init); several "
                        "seeds put seed-to-seed variation into the intervals (default %(default)s)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override applied to every arm (repeatable)")
    r.set_defaults(func=run_reproduce)

    from l2p.toy.world import CATEGORIES, SPLITS

    w = toy_sub.add_parser(
        "prompts",
        help="write a ShapesWorld prompts file (the input of l2p eval)",
        description="N ShapesWorld scenes with their prompts, cycling through the categories, "
                    "as JSON Lines (l2p.toy.prompts). l2p toy train-source --eval-prompts N scores "
                    "a new source on --split heldout --seed 1000 and --split train --seed 2000: "
                    "those files let l2p compare pair another model with a source's record.",
    )
    w.add_argument("--out", required=True, help="the prompts file to write (.jsonl)")
    w.add_argument("--num", type=int, default=600, help="number of prompts (default %(default)s)")
    w.add_argument("--split", choices=SPLITS, default="heldout",
                   help="heldout: every prompt names a combination training never shows; train: the "
                        "training distribution (default %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="scene stream seed (default %(default)s)")
    w.add_argument("--categories", default=",".join(CATEGORIES),
                   help="comma-separated categories (default: all six)")
    w.set_defaults(func=run_prompts)

    from l2p.toy.diagnose import DiagnosePlan

    dp = DiagnosePlan(model="")
    g = toy_sub.add_parser(
        "diagnose",
        help="where along the denoising path a pixel model falls behind its toy source",
        description="Handoff: the source's images for held-out prompts, noised to each sigma and "
                    "finished by the pixel model, scored. Prompt use: each model's clean-image "
                    "estimate error with and without the prompt at each sigma. Feature "
                    "alignment: how close the hidden states entering each block are to the "
                    "source's for the same image. Writes diagnose.md and diagnose.json.",
    )
    g.add_argument("--model", required=True, help="the pixel pipeline folder (l2p-train's final/pipeline)")
    g.add_argument("--source", default=dp.source, help="toy source folder (default: the shipped one)")
    g.add_argument("--out", default="runs/toy/diagnose", help="report folder (default %(default)s)")
    g.add_argument("--prompts", type=int, default=dp.prompts, help="held-out prompts (default %(default)s)")
    g.add_argument("--handoff-sigmas", default=",".join(f"{s:g}" for s in dp.handoff_sigmas),
                   help="noise levels the pixel model starts from (default %(default)s; 1 = pure noise)")
    g.add_argument("--probe-sigmas", default=",".join(f"{s:g}" for s in dp.probe_sigmas),
                   help="noise levels of the prompt-use and alignment probes (default %(default)s)")
    g.add_argument("--steps", type=int, default=dp.steps, help="sampling steps (default %(default)s)")
    g.add_argument("--guidance", type=float, default=dp.guidance, help="guidance scale (default %(default)s)")
    g.add_argument("--seed", type=int, default=dp.seed, help="prompts and noise seed (default %(default)s)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    g.set_defaults(func=run_diagnose)
