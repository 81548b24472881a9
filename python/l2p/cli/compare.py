"""``l2p compare``: two scored toy models, paired prompt by prompt, overall and per category."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from l2p.atomic import write_json
    from l2p.toy.comparison import compare_runs, format_comparison, load_scored_run

    report = compare_runs(load_scored_run(args.a, args.split), load_scored_run(args.b, args.split),
                          rounds=args.rounds)
    print(format_comparison(report))
    if args.out:
        write_json(args.out, report, indent=2)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="is toy model A better than B beyond noise? (paired, per category)",
        description="The difference A - B between two scored ShapesWorld runs, overall and in each "
                    "category, with 95% paired-bootstrap intervals: each round resamples the "
                    "prompts within each category and uses the same picks for both, so prompt "
                    "difficulty cancels. A and B are scores files written by l2p eval on the same "
                    "prompts file, or toy source folders ('toy' for the shipped one) whose "
                    "training record holds the scores l2p toy train-source --eval-prompts added.",
    )
    p.add_argument("a", help="scores file (l2p eval --out) or toy source folder")
    p.add_argument("b", help="the same, for the model A is measured against")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="which scores of a source folder's training record (default heldout)")
    p.add_argument("--rounds", type=_positive_int, default=2000, help="bootstrap rounds (default 2000)")
    p.add_argument("--out", default=None, help="also write the comparison here (JSON)")
    p.set_defaults(func=run)
