"""Tiny pipelines, datasets and config helpers for the trainer tests (random weights, nothing
downloaded).

PixArt-Sigma comes from ``l2p.testing``; SD3 and FLUX are built here with character-level
CLIP and T5 tokenizers, 16-token CLIP contexts and 16/32-wide text encoders, so a training
step takes well under a second on two CPU cores. Every VAE has factor 2, so the pixel patch is
4 (PixArt, SD3: latent patch 2; FLUX: packed 2x2) and 32x32 images give an 8x8 token grid.
"""

from __future__ import annotations

import csv
import os
import string
from pathlib import Path

import numpy as np
import torch

_CHARS = string.ascii_letters + string.digits + string.punctuation


def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_encoder(cls, tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                              projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    from l2p.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    enc = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                  num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                  pad_token_id=0, eos_token_id=1)).eval()
    return tok, enc


def tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32).eval()


def build_sd3(path: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2 = clip_tokenizer(), clip_tokenizer()
    te1 = clip_encoder(CLIPTextModelWithProjection, tok1, 16, 8)
    te2 = clip_encoder(CLIPTextModelWithProjection, tok2, 16, 8)
    tok3, te3 = t5_encoder(32)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=4,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(16), text_encoder=te1, tokenizer=tok1, text_encoder_2=te2,
                                    tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_flux(path: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok1 = clip_tokenizer()
    te1 = clip_encoder(CLIPTextModel, tok1, 16, 16)
    tok2, te2 = t5_encoder(32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(16), text_encoder=te1,
                        tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_pixart(path: Path, seed: int = 0) -> Path:
    from l2p.testing import build_tiny_pixart_sigma_pipeline

    build_tiny_pixart_sigma_pipeline(path, seed=seed)
    return path


BUILDERS = {"pixart": build_pixart, "sd3": build_sd3, "flux": build_flux}


def make_images(root: Path, n: int = 8, size: int = 32, seed: int = 0,
                sizes: list[tuple[int, int]] | None = None) -> Path:
    """``n`` smooth random images with captions in ``root`` (metadata.csv layout); image i has
    ``sizes[i % len(sizes)]`` (width, height) when given, else ``size``."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, size=(4, 4, 3)).astype(np.uint8)
        wh = sizes[i % len(sizes)] if sizes else (size, size)
        img = Image.fromarray(base).resize(wh, Image.BILINEAR)
        name = f"img_{i:03d}.png"
        img.save(root / name)
        rows.append({"file_name": name, "text": f"a picture number {i}, with colours"})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "text"])
        w.writeheader()
        w.writerows(rows)
    return root


FAMILIES = ("pixart", "sd3", "flux")


def overrides(source: Path, data: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.source": source, "model.trainable": "first_last:1", "model.head_channels": "[8,16]",
        "data.path": data, "data.resolution": 32, "data.embeddings": "null",
        "train.output_dir": out, "train.max_steps": 6, "train.batch_size": 2, "train.seed": 0,
        "optim.lr": 1e-3, "optim.schedule": "cosine", "optim.warmup_steps": 2,
        "checkpoint.every": 3, "checkpoint.keep_last": 2, "ema.decay": 0.9,
        "logging.progress_bar": "false", "logging.tensorboard": "false",
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def make_config(source: Path, data: Path, out: Path, **extra):
    from l2p.train.config import load_config

    return load_config(None, overrides(source, data, out, **extra))


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: this checkout's l2p first, one thread each."""
    import l2p

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(l2p.__file__).parent.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env
