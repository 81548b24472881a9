"""``l2p convert``: a diffusers transformer or pipeline folder -> its pixel-space version."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from l2p.conversion import convert_folder
    from l2p.data.generate import TOY_SOURCE, resolve_source

    source = resolve_source(args.source) if args.source == TOY_SOURCE else args.source
    report = convert_folder(
        source, args.out, patch_size=args.patch_size, head=args.head, seed=args.seed,
        published_l2p=args.published_l2p,
    )
    if not args.published_l2p:  # else every tensor came from the checkpoint (convert_folder said so)
        print(report)
    print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a latent diffusers transformer (or pipeline) folder to pixel space",
        description="Convert a diffusers transformer folder, or a pipeline folder (written "
        "without its VAE), to an L2P pixel model. Reads safetensors only.",
    )
    p.add_argument("--source", required=True,
                   help="transformer or pipeline folder (save_pretrained layout), or 'toy' (the toy "
                        "source shipped with l2p)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="pixel patch P (default latent patch x VAE factor: 16, Sana 32)")
    p.add_argument("--head", choices=("detailer", "linear"), default="detailer", help="output head")
    p.add_argument("--seed", type=int, default=0, help="seed of the new layers' initialisation")
    p.add_argument("--published-l2p", default=None, metavar="CHECKPOINT",
                   help="a published L2P checkpoint of this source (.safetensors file or folder of "
                        "shards): the pixel model takes its weights, patch and decoder layout "
                        "(Z-Image L2P)")
    p.set_defaults(func=run)
