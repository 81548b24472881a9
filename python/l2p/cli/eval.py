"""``l2p eval``: GenEval-style scores of a toy model on a ShapesWorld prompts file."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from l2p.atomic import write_json
    from l2p.data.generate import resolve_source
    from l2p.toy.prompts import read_prompts
    from l2p.toy.scoring import images_for_prompts, score_generated

    model = resolve_source(args.model)
    records = read_prompts(args.prompts)
    if args.limit:
        records = records[: args.limit]
    images = images_for_prompts(model, [r.prompt for r in records], seed=args.seed, steps=args.steps,
                                guidance=args.guidance, guidance_max_sigma=args.guidance_max_sigma,
                                pixel_shift=args.shift, batch_size=args.batch_size, int8=args.int8)
    summary = score_generated(images, records)
    summary.update(model=str(model), prompts=str(args.prompts), seed=args.seed, steps=args.steps,
                   guidance=args.guidance, guidance_max_sigma=args.guidance_max_sigma, shift=args.shift,
                   noise_device="cpu", int8=args.int8)
    write_json(args.out, summary, indent=2)
    low, high = summary["ci95"]
    from l2p.toy.world import CATEGORIES

    if len(summary["per_category"]) < len(CATEGORIES):
        absent = sorted(set(CATEGORIES) - set(summary["per_category"]))
        print(f"note: no prompts of {', '.join(absent)} (--limit {args.limit}?): the overall is the mean over "
              f"{len(summary['per_category'])} categories, not GenEval's {len(CATEGORIES)}")
    print(f"overall {summary['overall']:.3f} (95% CI {low:.3f}-{high:.3f}) on {summary['n']} images; "
          + " ".join(f"{k}={v:.2f}" for k, v in summary["per_category"].items()))
    for kind, part in summary.get("heldout_named", {}).items():
        what = ("prompts naming a held-out combination" if kind == "novel"
                else "held-out prompts that name none (training gives them too)")
        print(f"  {what}: overall {part['overall']:.3f} on {part['n']} images; "
              + " ".join(f"{k}={v:.2f}" for k, v in part["per_category"].items()))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a toy model (source or pixel) on ShapesWorld prompts",
        description="Generate one image per ShapesWorld prompt record and score it with the "
                    "GenEval-style scorer: overall (mean of per-category accuracy), per category, "
                    "and a 95% bootstrap interval. The model is a toy source pipeline folder "
                    "('toy' for the shipped one) or a pixel pipeline written by l2p convert / "
                    "l2p-train.",
    )
    p.add_argument("--model", required=True, help="pipeline folder, or 'toy'")
    p.add_argument("--prompts", required=True, help="ShapesWorld prompts file (.jsonl)")
    p.add_argument("--out", default="scores.json", help="where the scores go (JSON)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--guidance-max-sigma", type=float, default=None,
                   help="guide only the steps at noise level sigma <= this (default: every step)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow time shift a pixel pipeline samples at (default: its scheduler's; a "
                        "latent source always samples at its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="score only the first N records")
    p.add_argument("--int8", action="store_true",
                   help="a pixel pipeline with int8 block weights (L2PPipeline.quantize_int8)")
    p.set_defaults(func=run)
