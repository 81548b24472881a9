"""Peak GPU memory and step time of the trainer on an SD3-Medium-sized source (about 2B
parameters in the transformer, random weights) at 1024 px, for the memory section of
``python/l2p/train/README.md``: plain, gradient checkpointing, low-memory mode, and frozen
blocks offloaded to host memory (FSDP2 in a process group of one). Run on a GPU machine:
``python tests/train/peak_memory.py [--small]`` (``--small`` shrinks the model to check the
script itself on a CPU)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _trainkit as kit  # noqa: E402


def build_source(path: Path, small: bool) -> int:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    dims = dict(layers=2, heads=2, joint=32, pooled=(8, 8), hidden=(8, 8)) if small else \
        dict(layers=24, heads=24, joint=4096, pooled=(768, 1280), hidden=(768, 1280))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=dims["layers"], attention_head_dim=64,
            num_attention_heads=dims["heads"], joint_attention_dim=dims["joint"],
            caption_projection_dim=64 * dims["heads"], pooled_projection_dim=sum(dims["pooled"]),
            out_channels=16, pos_embed_max_size=192).to(torch.bfloat16)
    n_params = sum(p.numel() for p in transformer.parameters())
    tok1, tok2 = kit.clip_tokenizer(), kit.clip_tokenizer()
    te1 = kit.clip_encoder(CLIPTextModelWithProjection, tok1, dims["hidden"][0], dims["pooled"][0])
    te2 = kit.clip_encoder(CLIPTextModelWithProjection, tok2, dims["hidden"][1], dims["pooled"][1])
    tok3, te3 = kit.t5_encoder(dims["joint"])
    pipe = StableDiffusion3Pipeline(transformer=transformer.cpu(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=kit.tiny_vae(16), text_encoder=te1, tokenizer=tok1, text_encoder_2=te2,
                                    tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    # vae factor 8 for the 1024 px / 4096-token setting: a 4-level VAE config (tiny widths)
    from diffusers import AutoencoderKL
    pipe.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=1, norm_num_groups=8)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return n_params


def measure(source: Path, data: Path, out: Path, size: int, steps: int, **extra) -> dict:
    from _trainkit import make_config
    from l2p.torchrun import DistEnv
    from l2p.train.distributed import shutdown_distributed
    from l2p.train.loop import Trainer

    torch.cuda.empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = make_config(source, data, out, data__resolution=size, model__trainable="first_last:5",
                      model__head_channels="[]", train__max_steps=steps, checkpoint__every=0,
                      ema__enabled="true", **extra)
    # FSDP2 (the offload setting) needs a process group; one process, as torchrun
    # --nproc-per-node 1 would start it.
    env = DistEnv(launched=True) if extra.get("distributed__strategy") == "fsdp" else DistEnv()
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, env)
        trainer.cfg.train.max_steps = steps
        load_s = time.perf_counter() - t0
        times, losses = [], []
        for _ in range(steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            # A skipped (non-finite) step never allocates AdamW's moments, so the peak of a run
            # whose steps were all skipped would be too low: the losses go into the row.
            losses.append(trainer.train_step()[0])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        row = {"setting": extra, "trainable_params": trainer.trainable_report.trainable,
               "total_params": trainer.trainable_report.total, "offloaded_blocks": trainer.offloaded_blocks,
               "peak_gib": round(peak, 2), "step_s": round(min(times[1:] or times), 3), "load_s": round(load_s, 1),
               "losses": [round(x, 4) for x in losses], "skipped_steps": trainer.skipped_steps}
        del trainer
    finally:
        shutdown_distributed()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default="peak_memory.json")
    args = parser.parse_args()
    size = 64 if args.small else 1024
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = build_source(tmp / "src", args.small)
        data = kit.make_images(tmp / "data", n=4, size=size)
        from l2p.data.embed import build_embedding_cache
        build_embedding_cache(tmp / "src", data, progress=False, device=device)
        rows = []
        settings = [
            dict(train__batch_size=1, model__gradient_checkpointing="all", low_memory__enabled="true"),
            dict(train__batch_size=1, model__gradient_checkpointing="none"),
            dict(train__batch_size=1, model__gradient_checkpointing="all"),
            dict(train__batch_size=4, model__gradient_checkpointing="all", low_memory__enabled="true"),
            dict(train__batch_size=1, model__gradient_checkpointing="all", low_memory__enabled="true",
                 distributed__strategy="fsdp", low_memory__cpu_offload="true"),
        ]
        for i, setting in enumerate(settings):
            try:
                rows.append(measure(tmp / "src", data, tmp / f"run{i}", size, 2, data__embeddings="auto",
                                    train__device=device, **setting))
            except Exception as exc:  # noqa: BLE001 - report and go on to the next setting
                rows.append({"setting": setting, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "source_params": n, "resolution": size, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
