"""``l2p-train`` / ``l2p train``: run the L2P migration described by a config.

    l2p-train                             (the ShapesWorld toy migration, end to end)
    l2p-train CONFIG.yaml [--set section.key=value ...] [--print-config]
    l2p-train --resume RUN_DIR            (continues RUN_DIR with its saved config.yaml)
    torchrun --nproc-per-node K -m l2p.train CONFIG.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see l2p/train/configs/toy.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest checkpoint")


def run(args: argparse.Namespace) -> int:
    from l2p.train.config import DEFAULT_CONFIG_DIR, load_config

    if args.config is None and args.resume is None and not args.print_config:
        # The embedded default: source corpus, training, scoring and report, on the toy.
        from l2p.toy.migration import MigrationPlan, run_toy_migration

        run_toy_migration(MigrationPlan(train_overrides=list(args.overrides)))
        return 0
    config_path = args.config
    overrides = list(args.overrides)
    if args.resume is not None:
        run_dir = Path(args.resume)
        if config_path is None:
            config_path = run_dir / "config.yaml"
            if not config_path.is_file():
                raise FileNotFoundError(f"{run_dir} has no config.yaml; pass the run's config too")
        overrides = [f"train.output_dir={run_dir}", "train.resume=latest", *overrides]
    if config_path is None:
        config_path = DEFAULT_CONFIG_DIR / "toy.yaml"
    cfg = load_config(config_path, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from l2p.train.loop import NonFiniteLossError, train

    try:
        result = train(cfg)
    except NonFiniteLossError as exc:
        print(f"l2p-train: stopped: {exc}", file=sys.stderr)
        return 3
    if result.final_dir is not None:
        print(f"[l2p-train] done at step {result.step} ({result.skipped_steps} skipped); "
              f"model and delta in {result.final_dir}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a pixel model from a latent source (L2P)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l2p-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"l2p-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
