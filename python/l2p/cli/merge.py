"""``l2p merge``: a converted base + a delta checkpoint -> the full trained model."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from l2p.conversion import merge_folder

    names = merge_folder(args.base, args.delta, args.out, log=lambda line: print(f"l2p merge: {line}"))
    print(f"merged {len(names)} tensors from {args.delta} into {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge a delta checkpoint onto the converted base model",
        description="Rebuild the full pixel model from the folder l2p convert wrote and a "
        "delta saved by l2p.save_delta; the result is bit-identical to the trained model.",
    )
    p.add_argument("--base", required=True, help="converted model or pipeline folder")
    p.add_argument("--delta", required=True, help="delta .safetensors from l2p.save_delta")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(func=run)
