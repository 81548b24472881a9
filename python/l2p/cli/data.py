"""``l2p data``: make the training data. ``prompts`` writes prompts (composed from the built-in
taxonomy, or read from a file and optionally expanded by a local LM), ``generate`` renders
them with the source pipeline, ``embed`` caches the source's prompt embeddings."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from l2p.data import prompts as P


def _log_to_stderr() -> None:
    # Per-image failures and skipped files are reported through logging.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _device_arg(name: str | None) -> str | None:
    """The checked ``--device``; None for the default, which the library resolves itself
    (cuda:LOCAL_RANK under torchrun)."""
    from l2p.devices import pick_device

    return None if name in (None, "auto") else str(pick_device(name))


def run_prompts(args: argparse.Namespace) -> int:
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num must be at least 1 (got {args.num}); leave it out with --input to keep "
                         "every prompt that passes the filter")
    block_words = [] if args.no_default_block_list else P.load_block_list()
    if args.block_list:
        block_words += P.load_block_list(args.block_list)
    prompt_filter = P.PromptFilter(min_chars=args.min_chars, max_chars=args.max_chars,
                                   block_words=block_words,
                                   near_duplicate_threshold=args.near_duplicate_threshold)
    if args.input:
        records = [P.PromptRecord(t) for t in P.read_prompts(args.input)]
        if args.expand_model:
            records = P.expand_prompts([r.text for r in records], args.expand_model, seed=args.seed)
        records = list(prompt_filter(records))
        if args.num is not None:
            records = records[:args.num]
    else:
        if args.num is None:
            raise ValueError("--num is required when prompts are composed from the taxonomy")
        if args.expand_model:
            raise ValueError("--expand-model rewrites prompts read with --input; composed prompts "
                             "are already full length")
        records = P.make_prompts(args.num, seed=args.seed, prompt_filter=prompt_filter)
    n = P.write_prompts(args.out, records)
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(prompt_filter.rejected.items())) or "none"
    print(f"wrote {n} prompts to {args.out} (rejected: {rejected})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from l2p.data.generate import GenerationConfig, generate_images, rebuild_metadata

    if args.merge_only:
        if not (Path(args.out) / "images").is_dir():
            # Else a mistyped --out would get a new folder with an empty metadata.csv, and exit 0.
            raise FileNotFoundError(f"{str(Path(args.out) / 'images')!r} does not exist: nothing to merge; "
                                    "--out must be a folder written by `l2p data generate`")
        print(f"metadata.csv: {rebuild_metadata(args.out)} rows")
        return 0
    if args.source is None or args.prompts is None:
        raise ValueError("--source and --prompts are required (unless --merge-only)")
    config = GenerationConfig(
        source=args.source, prompts=args.prompts, out=args.out, images_per_prompt=args.images_per_prompt,
        steps=args.steps, guidance=args.guidance, height=args.height, width=args.width, seed=args.seed,
        batch_size=args.batch_size, device=_device_arg(args.device), dtype=args.dtype)
    _log_to_stderr()
    summary = generate_images(config)
    print(summary)
    # Some failed images are not an error of the run (the next run retries them). When every
    # image one rank tried failed, the run is broken, not unlucky: every rank says so in its
    # exit status, agreed after metadata.csv is written (generate_images ends collectively).
    return 1 if summary.broken_ranks else 0


def run_embed(args: argparse.Namespace) -> int:
    from l2p.data.embed import build_embedding_cache
    from l2p.torchrun import DistEnv

    _log_to_stderr()
    env = DistEnv.from_torchrun()
    if not env.is_main:
        # Every rank would encode every caption into the same files, all on the default device
        # (cuda:0): N copies of the text encoders on one GPU. One process writes the cache.
        print(f"rank {env.rank}: l2p data embed runs on rank 0 only; nothing to do here")
        return 0
    summary = build_embedding_cache(args.source, args.data, out=args.out, batch_size=args.batch_size,
                                    shard_size=args.shard_size, caption_column=args.caption_column,
                                    device=_device_arg(args.device), dtype=args.dtype,
                                    extra_captions=args.prompt)
    print(f"{summary['encoded']} captions encoded, {summary['cached_before']} already cached "
          f"({summary['captions']} in all, with the empty caption) -> {summary['out']}")
    return 0


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:N (default auto: cuda, cuda:LOCAL_RANK under torchrun, "
                        "if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="make training data: prompts, images, embedding cache")
    sub = data.add_subparsers(dest="data_command", metavar="STEP")
    sub.required = True

    p = sub.add_parser("prompts", help="compose (or read, expand) and filter prompts to a .jsonl file")
    p.add_argument("--num", type=int, default=None, help="how many prompts (required when composing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .jsonl (text, source, category)")
    p.add_argument("--input", default=None, help="read prompts from .txt/.csv/.jsonl instead of composing")
    p.add_argument("--expand-model", default=None,
                   help="folder of a local transformers causal LM that rewrites --input prompts")
    p.add_argument("--min-chars", type=int, default=P.DEFAULT_MIN_CHARS)
    p.add_argument("--max-chars", type=int, default=P.DEFAULT_MAX_CHARS)
    p.add_argument("--block-list", default=None, help="file of extra blocked words, one a line")
    p.add_argument("--no-default-block-list", action="store_true", help="do not apply the built-in block list")
    p.add_argument("--near-duplicate-threshold", type=float, default=P.DEFAULT_NEAR_DUPLICATE_THRESHOLD,
                   help="word-3-gram Jaccard similarity at which a prompt counts as a duplicate")
    p.set_defaults(func=run_prompts)

    g = sub.add_parser("generate", help="render images + metadata.csv with the source pipeline "
                                        "(resumable; run under torchrun for several GPUs)")
    g.add_argument("--source", default=None,
                   help="local diffusers pipeline folder (or 'toy'); a converted L2P pipeline folder "
                        "renders with the pixel model")
    g.add_argument("--prompts", default=None, help="prompt file: .txt, .csv or .jsonl")
    g.add_argument("--out", required=True, help="output folder: images/, metadata.csv, generation.json")
    g.add_argument("--images-per-prompt", type=int, default=2)
    g.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    g.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--merge-only", action="store_true", help="only rebuild metadata.csv from the PNGs in --out")
    _device_args(g)
    g.set_defaults(func=run_generate)

    e = sub.add_parser("embed", help="cache the source's prompt embeddings of a dataset's captions")
    e.add_argument("--source", required=True, help="local diffusers pipeline folder")
    e.add_argument("--data", required=True, help="dataset folder (metadata.csv or images + .txt captions)")
    e.add_argument("--out", default=None, help="cache folder (default DATA/embeddings)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--shard-size", type=int, default=1024, help="captions per safetensors shard")
    e.add_argument("--caption-column", default=None, help="metadata.csv column with the captions")
    e.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="also cache this prompt (repeatable): prompts used beside the captions, "
                        "such as the trainer's sample.prompts")
    _device_args(e)
    e.set_defaults(func=run_embed)
