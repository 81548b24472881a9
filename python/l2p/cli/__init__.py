"""The ``l2p`` command. Each subcommand lives in its own module under ``l2p.cli`` and
exposes ``register(subparsers)``; adding one is one module plus one line in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under l2p.cli, in the order ``l2p --help`` lists them.
SUBCOMMANDS = [
    "info",
    "convert",
    "merge",
    "train",
    "sample",
    "data",
    "toy",
    "eval",
    "compare",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2p",
        description="Latent-to-pixel transfer for diffusers transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"l2p.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        # Mistakes a user can fix: one line, no traceback. OSError (FileNotFoundError,
        # PermissionError, a full disk) is a file the user named or a folder they must fix;
        # diffusers raises it for a model folder without the files it expects, with a message
        # of several lines, joined here. Bugs raise other types and keep their traceback.
        message = " ".join(str(exc).split())
        print(f"l2p {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
