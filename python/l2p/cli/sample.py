"""``l2p sample``: text to PNG with a converted (pixel-space) pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def _paths(out: str, count: int) -> list[Path]:
    """One PNG per image: OUT itself for one image (a .png name), else OUT/NNN.png or
    OUT-NNN.png for a .png name."""
    out_path = Path(out)
    if out_path.suffix.lower() == ".png":
        if count == 1:
            return [out_path]
        return [out_path.with_name(f"{out_path.stem}-{i:03d}.png") for i in range(count)]
    return [out_path / f"{i:03d}.png" for i in range(count)]


def _shift(value: str) -> float | str:
    if value == "recommended":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'recommended', got {value!r}") from None


def _guidance_option(value: str) -> tuple[str, object]:
    import yaml

    name, sep, text = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. cfg_trunc_ratio=0.5), got {value!r}")
    return name.strip(), yaml.safe_load(text)


def _lora(value: str) -> tuple[str, float]:
    """PATH or PATH:SCALE (the scale after the last colon when it is a number)."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


def run(args: argparse.Namespace) -> int:
    import torch

    from l2p.atomic import atomic_path
    from l2p.devices import pick_device
    from l2p.sample.pipeline import L2PPipeline

    device = pick_device(args.device)  # before loading: a wrong device costs no model load
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = L2PPipeline.from_pretrained(args.model, torch_dtype=dtype, attention=args.attention)
    for path, scale in args.lora:
        fused = pipe.fuse_lora(path, lora_scale=scale)
        print(f"fused {path} at scale {scale:g} into {len(fused.fused)} layers"
              + (f" ({len(fused.skipped)} LoRA layers not in the pixel model, see the warnings)"
                 if fused.skipped else ""))
    if args.int8:
        report = pipe.quantize_int8()
        print(f"int8 weights in {report.layers} block layers: transformer "
              f"{report.bytes_before / 2**20:.1f} -> {report.bytes_after / 2**20:.1f} MiB")
    if args.offload == "blocks":
        pipe.enable_block_offload(device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device)
    else:
        pipe.to(device)
    if args.tile_size is not None:
        pipe.enable_head_tiling(args.tile_size or None)
    # A CPU generator: diffusers draws the noise on the CPU and moves it, so an image does
    # not depend on the device.
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(args.prompt, args.negative_prompt, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  true_cfg_scale=args.true_cfg, num_images_per_prompt=args.num_images,
                  generator=generator, shift=args.shift, guidance_max_sigma=args.guidance_max_sigma,
                  **dict(args.guidance_option)).images
    paths = _paths(args.out, len(images))
    for image, path in zip(images, paths):
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate PNGs with a converted pixel-space pipeline",
        description="Text to image in pixel space with a folder written by `l2p convert --source "
        "PIPELINE` (and trained): the source's text encoders, scheduler and guidance, no VAE.",
    )
    p.add_argument("--model", required=True, help="converted pipeline folder")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt (repeat for several prompts); DiT: a class name or id")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for guidance (default empty)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of the patch size (default: the source's, scaled by the "
                        "model's patch over the source's)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of the patch size (default: the source's, scaled by the "
                        "model's patch over the source's)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the source pipeline's, e.g. 20 PixArt, 28 SD3 and FLUX)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale, read as the source's own pipeline reads it (classifier-free; "
                        "Z-Image: cond + g (cond - uncond), on for any g > 0; FLUX and Qwen-Image: "
                        "the guidance embedding, where the model has one); default: the source "
                        "pipeline's (4.5 PixArt, 7.0 SD3, 3.5 FLUX, ...)")
    p.add_argument("--true-cfg", type=float, default=None,
                   help="classifier-free guidance of FLUX and Qwen-Image (> 1 turns it on; default: "
                        "the source pipeline's with --negative-prompt, else off)")
    p.add_argument("--shift", type=_shift, default=None,
                   help="flow time shift overriding the source's, or 'recommended' (the source's own "
                   "schedule up to 1024x1024, above it 1.5x the source's 1K shift at 4K; "
                   "l2p.sample.recommended_shift)")
    p.add_argument("--guidance-max-sigma", type=float, default=None,
                   help="guide only the steps at noise level sigma <= this (flow sources: 0..1); the "
                        "noisier steps follow the conditional prediction alone (default: every step)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--tile-size", type=int, default=None,
                   help="run the Detailer Head in tiles of this many pixels (0: sized from free memory)")
    p.add_argument("--attention", choices=("auto", "l2p", "native"), default="auto",
                   help="attention kernels inside the transformer")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default auto: cuda if available, else cpu)")
    p.add_argument("--guidance-option", action="append", default=[], type=_guidance_option, metavar="NAME=VALUE",
                   help="an option of the source pipeline's own guidance, by its name (repeatable): "
                        "Lumina2 cfg_trunc_ratio, cfg_normalization; Z-Image cfg_truncation, cfg_normalization")
    p.add_argument("--int8", action="store_true",
                   help="store the transformer blocks' Linear weights as int8 (weight-only, per-row "
                        "scales; after --lora): about half the memory of bf16 weights")
    p.add_argument("--offload", nargs="?", const="model", choices=("model", "blocks"), default=None,
                   help="keep the weights in host memory: 'model' (the default of a bare --offload) moves "
                        "the text encoders and the transformer to the device each only while it runs (for "
                        "GPUs that cannot hold both); 'blocks' moves each block only for its own forward "
                        "(for GPUs that cannot hold the transformer; slower)")
    p.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:SCALE]",
                   help="a LoRA made for the source model (.safetensors), fused into the weights at "
                        "SCALE (default 1); repeat for several")
    p.add_argument("--out", default="sample.png",
                   help="a .png file (several images: NAME-000.png, ...) or a folder (000.png, ...)")
    p.set_defaults(func=run)
