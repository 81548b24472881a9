"""The toy source model: a real diffusers PixArt-Sigma pipeline trained on ShapesWorld.

It plays the part a pretrained latent DiT plays in L2P: a latent text-to-image model whose
own generations become the pixel model's training data. Every part is a stock diffusers /
transformers class, saved with ``save_pretrained`` (safetensors), so
``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads it like any checkpoint:

- ``vae``: AutoencoderKL, 64x64x3 <-> 16x16x4 (factor 4), trained first on reconstructions;
- ``text_encoder``: a small T5 encoder, trained jointly with the transformer;
- ``tokenizer``: a T5 (unigram) tokenizer whose pieces are ShapesWorld's words;
- ``transformer``: PixArtTransformer2DModel (patch 2, so an 8x8 token grid), flow matching;
- ``scheduler``: DPMSolverMultistepScheduler in flow-prediction mode (as Sana uses it), so the
  pipeline samples the flow ODE. At 64 px, call the pipeline with
  ``use_resolution_binning=False`` (its bins start at 256 px).

``train_toy_source`` runs the whole recipe on whatever device is given; ``l2p toy
train-source`` is its command.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from l2p.atomic import write_json
from l2p.toy import world as toy_world
from l2p.toy.grammar import generate_scenes
from l2p.toy.render import render_array
from l2p.toy.text_encoder import OBJECTIVES as TEXT_OBJECTIVES
from l2p.toy.text_encoder import order_blindness, pretrain_text_encoder, tokenize_prompts

# Where the shipped, trained toy source lives inside the package.
SHIPPED_SOURCE_DIR = Path(__file__).resolve().parent / "weights" / "shapes-pixart"


@dataclass
class ToySourceConfig:
    """Architecture and training recipe of the toy source. Defaults are the shipped model's."""

    image_size: int = 64
    # AutoencoderKL: len(vae_channels) - 1 downsamplings, so factor 4 with three levels. No
    # attention in its mid block: the autoencoder is then fully convolutional, so training it
    # on vae_crop x vae_crop crops (4x cheaper than whole 64 px images) trains exactly the
    # function it applies to whole images.
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    vae_crop: int = 32
    # PixArt transformer (2.3M parameters: a small model seeing many small batches learns
    # more per CPU-second than a larger one seeing few large batches).
    layers: int = 8
    heads: int = 4
    head_dim: int = 32
    latent_patch: int = 2
    # T5 text encoder.
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 24
    # Pretraining the text encoder on the training prompts alone before the transformer phase
    # (l2p.toy.text_encoder), so that its outputs carry word order; 0 steps = none, the encoder
    # then starts the transformer phase as it is (random, or the continued folder's). Objectives:
    # "denoise" (a T5 decoder reconstructs each prompt from a copy with words replaced at
    # text_corrupt_rate), "context" (each word's output predicts the text_context_window words
    # on either side of it) or "preceding" (the text_context_window words before it).
    text_pretrain_steps: int = 0
    text_pretrain_objective: str = "denoise"
    text_pretrain_batch: int = 256
    text_pretrain_lr: float = 1e-3
    text_corrupt_rate: float = 0.15
    text_context_window: int = 4
    # The text encoder's learning rate in the transformer phase, as a fraction of dit_lr; 0
    # freezes it (PixArt, SD3 and FLUX keep their pretrained T5 frozen).
    text_lr_scale: float = 1.0
    # Data: ShapesWorld renders of the training split.
    train_scenes: int = 30000
    data_seed: int = 0
    # Recipe.
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    dit_steps: int = 40000
    dit_batch: int = 32
    dit_lr: float = 5e-4
    warmup_steps: int = 500
    caption_dropout: float = 0.1
    flow_shift: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    # Held-out ground-truth renders whose autoencoder round trips are scored after phase 1.
    vae_eval_scenes: int = 600
    seed: int = 0
    workers: int = 0  # processes for rendering; 0 = one per CPU
    # Wall-clock budget for both training phases (0 = none). When set, each phase measures
    # its speed on its first steps and shortens its schedule to fit its share (a quarter for
    # the autoencoder); the steps actually run are written to the training record.
    time_budget_s: float = 0.0
    # Continue training a trained toy source folder (same architecture) instead of starting
    # from random weights: its autoencoder is kept (phase 1 is skipped) and its transformer and
    # text encoder are trained further on a fresh schedule. Empty: train from scratch.
    init_from: str = ""
    # Take the trained autoencoder (and its latent scaling) of this toy source folder and train
    # a new transformer and text encoder from random weights, e.g. to compare transformer or
    # text-encoder sizes on the same latents. Empty: train an autoencoder (or keep init_from's).
    vae_from: str = ""

    def scaled(self, **overrides) -> "ToySourceConfig":
        return ToySourceConfig(**{**asdict(self), **overrides})

    def validate(self) -> "ToySourceConfig":
        """ValueError naming the first setting out of range, before any work starts."""
        for name in ("image_size", "latent_channels", "vae_crop", "layers", "heads", "head_dim",
                     "latent_patch", "text_dim", "text_layers", "text_heads", "max_tokens",
                     "text_pretrain_batch", "text_context_window", "train_scenes", "vae_batch",
                     "dit_steps", "dit_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text_pretrain_steps", "vae_steps", "warmup_steps", "vae_eval_scenes", "workers",
                     "time_budget_s", "text_lr_scale", "vae_kl_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("vae_lr", "dit_lr", "text_pretrain_lr", "flow_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("caption_dropout", "text_corrupt_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.vae_channels or any(c < 1 for c in self.vae_channels):
            raise ValueError(f"vae_channels must be positive widths, got {self.vae_channels}")
        # Each autoencoder level halves the image, and the transformer patches the latent.
        step = 2 ** (len(self.vae_channels) - 1) * self.latent_patch
        for name in ("image_size", "vae_crop"):
            if getattr(self, name) % step:
                raise ValueError(f"{name} must be a multiple of {step} (the autoencoder's factor "
                                 f"{step // self.latent_patch} x latent_patch {self.latent_patch}), "
                                 f"got {getattr(self, name)}")
        if self.vae_crop > self.image_size:
            raise ValueError(f"vae_crop ({self.vae_crop}) must not exceed image_size ({self.image_size})")
        if self.text_pretrain_objective not in TEXT_OBJECTIVES:
            raise ValueError(f"unknown text_pretrain_objective {self.text_pretrain_objective!r}; choose "
                             f"one of {', '.join(TEXT_OBJECTIVES)}")
        if self.init_from and self.vae_from:
            raise ValueError("init_from continues a whole toy source, its autoencoder included; "
                             "vae_from takes only the autoencoder: pass one of them")
        return self


def toy_vocabulary() -> list[str]:
    """Every word a ShapesWorld prompt can use."""
    words = {"a", "an", "and", "of", "the", "to"}
    words.update(toy_world.NUMBER_WORDS.values())
    words.update(toy_world.PALETTE)
    words.update(toy_world.SIZES)
    words.update(toy_world.SHAPES)
    words.update(toy_world.PLURALS.values())
    for phrase in toy_world.RELATION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def build_toy_tokenizer(max_tokens: int = 24):
    """A T5 unigram tokenizer whose pieces are whole ShapesWorld words (plus single letters,
    so an unknown word still tokenizes, letter by letter)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in toy_vocabulary()]
    vocab += [("\u2581", -5.0)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz.,"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_tokens)


def build_toy_pipeline(cfg: ToySourceConfig, seed: int = 0):
    """An untrained PixArtSigmaPipeline with the toy architecture (deterministic in seed)."""
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline,
                           PixArtTransformer2DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    levels = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        norm_num_groups=min(16, min(cfg.vae_channels)), sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )
    factor = 2 ** (levels - 1)
    tokenizer = build_toy_tokenizer(cfg.max_tokens)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=cfg.text_dim // cfg.text_heads,
        d_ff=cfg.text_dim * 2, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    inner = cfg.heads * cfg.head_dim
    transformer = PixArtTransformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        num_layers=cfg.layers, cross_attention_dim=inner, caption_channels=cfg.text_dim,
        sample_size=cfg.image_size // factor, patch_size=cfg.latent_patch,
        norm_num_groups=1, interpolation_scale=1, use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=cfg.flow_shift,
    )
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)


# The fields that fix the architecture: a run that continues a trained folder must match them,
# and one that takes only its autoencoder must match the autoencoder's.
AUTOENCODER_FIELDS = ("image_size", "vae_channels", "latent_channels")
ARCHITECTURE_FIELDS = AUTOENCODER_FIELDS + ("layers", "heads", "head_dim", "latent_patch", "text_dim",
                                            "text_layers", "text_heads", "max_tokens")


def _trained_record(cfg: ToySourceConfig, option: str, fields: tuple[str, ...]) -> dict:
    """The training record of the folder that ``cfg.<option>`` names, after checking that its
    config agrees with ``cfg`` on ``fields``."""
    folder = Path(getattr(cfg, option))
    record_path = folder / "training_record.json"
    if not record_path.exists():
        raise FileNotFoundError(f"{option}={folder} has no training_record.json: use a folder "
                                f"written by `l2p toy train-source`")
    previous = json.loads(record_path.read_text())
    ours = json.loads(json.dumps(asdict(cfg)))  # as the record stores it (tuples as lists)
    mismatched = [f"{name}: folder {previous['config'].get(name)!r}, config {ours[name]!r}"
                  for name in fields if previous["config"].get(name) != ours[name]]
    if mismatched:
        raise ValueError(f"{option}={folder} has another architecture than the config ("
                         + "; ".join(mismatched) + "); pass the folder's values or train from scratch")
    return previous


def load_for_continuation(cfg: ToySourceConfig):
    """The trained pipeline at ``cfg.init_from`` and its training record, after checking that
    it has the architecture ``cfg`` describes."""
    previous = _trained_record(cfg, "init_from", ARCHITECTURE_FIELDS)
    return load_toy_source(cfg.init_from), previous


def load_autoencoder(cfg: ToySourceConfig):
    """The trained autoencoder of the folder ``cfg.vae_from`` and that folder's record, after
    checking that the autoencoder has the shape ``cfg`` describes."""
    from diffusers import AutoencoderKL

    previous = _trained_record(cfg, "vae_from", AUTOENCODER_FIELDS)
    return AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vae", local_files_only=True,
                                         use_safetensors=True), previous


def _render_one(args) -> np.ndarray:
    scene_dict, size = args
    return render_array(toy_world.Scene.from_dict(scene_dict), size)


def render_training_set(n: int, seed: int, size: int, workers: int = 0):
    """``n`` ShapesWorld training scenes: (uint8 images (n, size, size, 3), prompts)."""
    scenes = generate_scenes(n, seed, split="train")
    jobs = [(s.to_dict(), size) for s in scenes]
    workers = workers or (os.cpu_count() or 1)
    if workers > 1 and n >= 256:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            images = pool.map(_render_one, jobs, chunksize=64)
    else:
        images = [_render_one(j) for j in jobs]
    return np.stack(images), [s.prompt for s in scenes]


def to_model_range(batch_uint8: np.ndarray, device="cpu") -> torch.Tensor:
    """Images (n, H, W, 3) uint8 -> (n, 3, H, W) float in [-1, 1], the models' pixel range."""
    x = torch.from_numpy(batch_uint8).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# Steps whose speed is not representative (allocator and autotuning warm-up), the steps
# whose speed first sets the schedule, and how often the schedule is re-fitted after them.
_WARMUP_STEPS, _TIMED_STEPS, _REFIT_EVERY = 10, 40, 100


class _Budget:
    """Fits a schedule of ``planned`` steps into ``budget_s`` seconds of wall clock: after
    the warm-up and the timed steps it sets the total from the measured speed, and re-fits it
    every ``_REFIT_EVERY`` steps from the speed since the warm-up (a machine that gets busier
    mid-run must not overrun the budget); never more than planned, never fewer than already
    run. No budget keeps the plan."""

    def __init__(self, planned: int, budget_s: float):
        self.planned = self.total = planned
        self.budget_s = budget_s
        self.started = time.time()
        self.timed_from = None

    def update(self, step: int) -> int:
        if self.budget_s <= 0:
            return self.total
        if step == _WARMUP_STEPS:
            self.timed_from = time.time()
        elif self.timed_from is not None and step >= _WARMUP_STEPS + _TIMED_STEPS and (
                step - _WARMUP_STEPS - _TIMED_STEPS) % _REFIT_EVERY == 0:
            now = time.time()
            per_step = (now - self.timed_from) / (step - _WARMUP_STEPS)
            left = self.budget_s - (now - self.started)
            self.total = max(step + 1, min(self.planned, step + int(left / per_step)))
        return self.total


def train_vae(vae, images: np.ndarray, cfg: ToySourceConfig, device, log: Callable[[str], None]):
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    budget = _Budget(cfg.vae_steps, cfg.time_budget_s * 0.25)
    total, step = cfg.vae_steps, 0
    while step < total:
        total = budget.update(step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, cfg.vae_lr, min(200, cfg.warmup_steps))
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen).numpy()
        x = _random_crops(to_model_range(images[idx], device), cfg.vae_crop, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == total - 1:
            log(f"vae step {step}/{total} loss {loss.item():.4f}")
        step += 1
    vae.eval()
    return total


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image, at offsets that are multiples of the
    autoencoder's total stride (4), so crops see the same pixel phase as whole images."""
    height = x.shape[-1]
    if size >= height:
        return x
    stride = 4
    offsets = torch.randint(0, (height - size) // stride + 1, (len(x), 2), generator=gen) * stride
    return torch.stack([img[:, oy:oy + size, ox:ox + size]
                        for img, (oy, ox) in zip(x, offsets.tolist())])


@torch.no_grad()
def reconstruction_score(vae, n: int, seed: int, size: int, device) -> dict:
    """The scorer's verdict on autoencoder round trips of ``n`` held-out ground-truth renders:
    an upper bound on what any generator working in this latent space can score."""
    from l2p.toy.prompts import make_records
    from l2p.toy.scoring import score_generated

    records = make_records(n, seed, split="heldout")
    images = np.stack([render_array(r.scene, size) for r in records])
    out = []
    for i in range(0, n, 64):
        x = to_model_range(images[i:i + 64], device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    recon = np.concatenate(out)
    summary = score_generated(recon, records)
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((recon.astype(np.float64) - images) ** 2))
    return {"overall": summary["overall"], "ci95": summary["ci95"],
            "per_category": summary["per_category"], "psnr_db": float(psnr)}


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device, batch: int = 256) -> torch.Tensor:
    """Posterior means of all images, unscaled, on the CPU."""
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_model_range(images[i:i + batch], device)).latent_dist.mean.cpu())
    return torch.cat(out)


def train_transformer(pipe, latents: torch.Tensor, prompts: list[str], cfg: ToySourceConfig,
                      device, log: Callable[[str], None], budget_s: float = 0.0,
                      work_dir: Path | None = None) -> int:
    """Flow matching on the scaled latents: x_t = (1-s) x0 + s eps, the model predicts
    eps - x0 at timestep 1000*s, s logit-normal; the text encoder trains jointly at
    ``cfg.text_lr_scale`` times the transformer's learning rate (0: frozen). An EMA of what
    trains is what the pipeline keeps. With ``work_dir``, a checkpoint (weights, EMA, optimizer,
    sampler state) is written atomically every ``cfg.checkpoint_every`` steps and the newest
    one is resumed from, so an interrupted run continues exactly where it stopped."""
    from l2p.train.checkpoint import (latest_checkpoint, load_checkpoint, optimizer_from_flat,
                                      recover_interrupted_save, save_checkpoint)
    from l2p.train.ema import EMA

    gen = torch.Generator().manual_seed(cfg.seed + 2)
    transformer, text_encoder = pipe.transformer.to(device), pipe.text_encoder.to(device)
    text_frozen = cfg.text_lr_scale == 0
    transformer.train()
    text_encoder.train(not text_frozen)
    text_encoder.requires_grad_(not text_frozen)
    named = {f"transformer.{n}": p for n, p in transformer.named_parameters()}
    text_named = {} if text_frozen else {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()}
    named.update(text_named)
    names, params = list(named), list(named.values())
    if cfg.text_lr_scale in (0, 1):
        groups = [{"params": params, "lr_scale": 1.0}]
    else:
        groups = [{"params": [p for n, p in named.items() if n not in text_named], "lr_scale": 1.0},
                  {"params": list(text_named.values()), "lr_scale": cfg.text_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=cfg.dit_lr, weight_decay=0.01)
    ema = EMA(named, cfg.ema_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    # The whole training set lives on the device, tokenized once: on a GPU the per-step
    # tokenizing and host-to-device copies would otherwise take a good share of each step.
    x0_all = (latents * pipe.vae.config.scaling_factor).to(device)
    all_ids, all_mask = (t.to(device) for t in tokenize_prompts(pipe.tokenizer, prompts, cfg.max_tokens))
    empty_ids, empty_mask = (t.to(device) for t in tokenize_prompts(pipe.tokenizer, [""], cfg.max_tokens))
    budget = _Budget(cfg.dit_steps, budget_s)
    total, step = cfg.dit_steps, 0
    if work_dir is not None:
        recover_interrupted_save(work_dir)
    resume = latest_checkpoint(work_dir) if work_dir is not None else None
    if resume is not None:
        ckpt = load_checkpoint(resume, rank=0)
        with torch.no_grad():
            for name, tensor in ckpt["trainable"].items():
                named[name].copy_(tensor)
        ema.load_state_dict(ckpt["ema"])
        optimizer_from_flat(opt, names, ckpt["optimizer"], ckpt["optimizer_meta"])
        gen.set_state(torch.tensor(ckpt["state"]["generator"], dtype=torch.uint8))
        step, total = ckpt["state"]["step"], ckpt["state"]["total"]
        # The schedule was fixed when the run was interrupted; a resumed run keeps it.
        budget = _Budget(total, 0.0)
        log(f"transformer: resumed from {resume} at step {step}/{total}")
    while step < total:
        total = budget.update(step)
        lr = _lr_at(step, total, cfg.dit_lr, min(cfg.warmup_steps, total // 10))
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        idx = torch.randint(0, len(prompts), (cfg.dit_batch,), generator=gen)
        drop = torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout
        idx_dev, drop_dev = idx.to(device), drop.to(device).view(-1, 1)
        ids = torch.where(drop_dev, empty_ids, all_ids[idx_dev])
        mask = torch.where(drop_dev, empty_mask, all_mask[idx_dev])
        x0 = x0_all[idx_dev]
        eps = torch.randn(x0.shape, generator=gen).to(device)
        s = torch.sigmoid(torch.randn(cfg.dit_batch, generator=gen)).to(device)
        if cfg.flow_shift != 1.0:
            s = cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        with autocast:
            with torch.set_grad_enabled(not text_frozen):
                emb = pipe.text_encoder(ids, attention_mask=mask)[0]
            pred = transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask,
                               timestep=s * 1000,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(pred.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema.update(step)
        if step % 250 == 1 or step == total:
            log(f"transformer step {step}/{total} loss {loss.item():.4f}")
        if work_dir is not None and (step % cfg.checkpoint_every == 0 or step == total):
            save_checkpoint(work_dir, step, rank=0, trainable={n: p.detach() for n, p in named.items()},
                            ema=ema.state_dict(), optimizer=opt, param_names=names,
                            state={"step": step, "total": total, "generator": gen.get_state().tolist()},
                            keep_last=1)
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(ema.shadow[name].to(param.dtype))
    transformer.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(True)
    return total


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def work_dir_for(out_dir: Path) -> Path:
    """Where an unfinished run keeps its autoencoder and checkpoints (beside the output)."""
    return out_dir.parent / f".{out_dir.name}.work"


def train_toy_source(cfg: ToySourceConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                     log: Callable[[str], None] = print, command: str | None = None) -> Path:
    """Render the training set, train the autoencoder, then the transformer and text encoder;
    write the pipeline folder (atomically) with a training record beside the weights.

    An interrupted run resumes when started again with the same config and output: the
    trained autoencoder and the transformer's checkpoints wait in ``work_dir_for(out_dir)``,
    which is removed once the pipeline folder is written."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    # The folders a run starts from are checked before its work folder exists, so that a
    # mistake leaves nothing behind that the corrected run would take for a foreign one.
    cfg.validate()
    if cfg.init_from:
        _trained_record(cfg, "init_from", ARCHITECTURE_FIELDS)
    if cfg.vae_from:
        _trained_record(cfg, "vae_from", AUTOENCODER_FIELDS)
    work = work_dir_for(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(f"{work} holds an unfinished run with a different config; rerun with that "
                         f"config (see {config_file}) or delete the folder to start over")
    write_json(config_file, asdict(cfg), indent=2)
    started = time.time()
    progress_file = work / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"seconds": 0.0}
    previous = vae_source = None
    if cfg.init_from:
        pipe, previous = load_for_continuation(cfg)
        log(f"continuing the toy source at {cfg.init_from}")
    else:
        pipe = build_toy_pipeline(cfg, seed=cfg.seed)
        if cfg.vae_from:
            pipe.vae, vae_source = load_autoencoder(cfg)
            log(f"autoencoder taken from {cfg.vae_from}; new transformer and text encoder")
    log(f"rendering {cfg.train_scenes} ShapesWorld scenes at {cfg.image_size}px")
    images, prompts = render_training_set(cfg.train_scenes, cfg.data_seed, cfg.image_size, cfg.workers)
    vae_dir = work / "vae"
    if previous is not None or vae_source is not None:
        # The continued (or named) folder's autoencoder and latent scaling stay as they are.
        progress.setdefault("vae_steps", 0)
        progress.setdefault("vae_reconstruction", (previous or vae_source).get("vae_reconstruction"))
        latents = encode_latents(pipe.vae.to(device), images, device)
    elif (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
        log(f"autoencoder: resumed from {vae_dir}")
        latents = encode_latents(pipe.vae.to(device), images, device)
    else:
        progress["vae_steps"] = train_vae(pipe.vae, images, cfg, device, log)
        latents = encode_latents(pipe.vae, images, device)
        # Unit variance in the transformer's space, as the published VAEs' scaling factors do.
        pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        progress["vae_reconstruction"] = reconstruction_score(pipe.vae, cfg.vae_eval_scenes, 1000,
                                                             cfg.image_size, device)
        log(f"autoencoder round trip of {cfg.vae_eval_scenes} held-out renders: scorer "
            f"{progress['vae_reconstruction']['overall']:.3f}, "
            f"PSNR {progress['vae_reconstruction']['psnr_db']:.1f} dB")
        tmp = _staging_dir(work, ".vae.")
        pipe.vae.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(vae_dir)
        progress["seconds"] += time.time() - started
        write_json(progress_file, progress, indent=2)
        started = time.time()
    log(f"latent scaling factor {pipe.vae.config.scaling_factor:.4f}")
    if cfg.text_pretrain_steps:
        _pretrain_text_phase(pipe, prompts, cfg, device, work, progress, log)
        progress["seconds"] += time.time() - started
        write_json(progress_file, progress, indent=2)
        started = time.time()
    remaining = cfg.time_budget_s - progress["seconds"] - (time.time() - started) if cfg.time_budget_s else 0.0
    dit_steps = train_transformer(pipe, latents, prompts, cfg, device, log,
                                  max(remaining, 1.0) if cfg.time_budget_s else 0.0, work_dir=work)
    pipe.to("cpu")
    elapsed = progress["seconds"] + time.time() - started
    record = {
        "config": asdict(cfg),
        "steps_run": {"vae": progress.get("vae_steps"), "transformer": dit_steps},
        "vae_reconstruction": progress.get("vae_reconstruction"),
        "command": command,
        "seconds": round(elapsed, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if "text_pretraining" in progress:
        record["text_pretraining"] = progress["text_pretraining"]
    record["text_encoder_order_blindness"] = round(
        order_blindness(pipe.text_encoder, pipe.tokenizer, cfg.max_tokens), 4)
    if vae_source is not None:
        record["autoencoder_from"] = {k: vae_source.get(k) for k in ("command", "date", "device")}
    if previous is not None:
        # The whole history: the run continued here, with its own history inside it.
        record["continued_from"] = {k: v for k, v in previous.items() if k != "eval"}
        if "eval" in previous:
            record["continued_from"]["eval"] = {
                split: {k: v for k, v in summary.items() if k != "failures"} if isinstance(summary, dict) else summary
                for split, summary in previous["eval"].items()}
        record["total_transformer_steps"] = dit_steps + previous.get(
            "total_transformer_steps", previous["steps_run"]["transformer"])
        record["total_seconds"] = round(elapsed + previous.get("total_seconds", previous["seconds"]), 1)
    save_pipeline_atomically(pipe, out_dir, extra_files={"training_record.json": json.dumps(record, indent=2)})
    shutil.rmtree(work, ignore_errors=True)
    log(f"toy source written to {out_dir} in {elapsed:.0f} s")
    return out_dir


def _pretrain_text_phase(pipe, prompts: list[str], cfg: ToySourceConfig, device, work: Path,
                         progress: dict, log: Callable[[str], None]) -> None:
    """Pretrain the text encoder on ``prompts`` (see l2p.toy.text_encoder), or take the
    pretrained one an interrupted run left in ``work``."""
    from transformers import T5EncoderModel

    saved = work / "text_encoder"
    if (saved / "config.json").exists():
        pipe.text_encoder = T5EncoderModel.from_pretrained(saved, use_safetensors=True)
        log(f"text encoder: pretrained one resumed from {saved}")
        return
    log(f"text encoder: pretraining on {len(prompts)} prompts, {cfg.text_pretrain_steps} steps")
    progress["text_pretraining"] = pretrain_text_encoder(
        pipe.text_encoder, pipe.tokenizer, prompts, steps=cfg.text_pretrain_steps,
        batch=cfg.text_pretrain_batch, lr=cfg.text_pretrain_lr, max_tokens=cfg.max_tokens,
        seed=cfg.seed + 3, device=device, objective=cfg.text_pretrain_objective,
        corrupt_rate=cfg.text_corrupt_rate, context_window=cfg.text_context_window, log=log)
    pipe.text_encoder.to("cpu")
    log(f"text encoder: {progress['text_pretraining']}")
    tmp = _staging_dir(work, ".text_encoder.")
    pipe.text_encoder.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(saved)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in ``parent`` to build in before renaming into place, with the
    permissions of a folder made by mkdir (mkdtemp's are owner-only)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def save_pipeline_atomically(pipe, out_dir: Path, extra_files: dict[str, str] | None = None) -> None:
    """save_pretrained into a sibling temporary folder, then swap it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _drop_local_paths(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _drop_local_paths(folder: Path) -> None:
    """Remove the ``_name_or_path`` that a pipeline loaded from disk writes into its configs:
    it names a folder of the machine that trained it, not anything the copy needs."""
    for config in folder.rglob("*.json"):
        data = json.loads(config.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_toy_source(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The toy source pipeline (the shipped one by default)."""
    from diffusers import PixArtSigmaPipeline

    path = Path(path) if path is not None else SHIPPED_SOURCE_DIR
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"no toy source at {path}: train one with `l2p toy train-source --out {path}`"
        )
    return PixArtSigmaPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device)


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seed: int = 0, steps: int = 20, guidance: float = 4.5,
             guidance_max_sigma: float | None = None, batch_size: int = 64) -> np.ndarray:
    """Images for ``prompts`` as uint8 (n, H, W, 3); image i uses generator seed ``seed + i``.

    ``guidance_max_sigma``: guidance only at the steps whose noise level (the scheduler's sigma)
    is at most this, as L2PPipeline's option of that name, so that a source and its pixel model
    can be compared under the same sampler. The diffusers pipeline guides every step, so at the
    noisier steps the conditional prediction stands in for the unconditional one: its
    uncond + w (cond - uncond) is then cond."""
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    hook = None
    if guidance_max_sigma is not None:
        scheduler = pipe.scheduler

        def conditional_only_when_noisier(module, args, kwargs, output):
            sigma = float(scheduler.sigmas[scheduler.step_index or 0])
            if sigma <= guidance_max_sigma or guidance <= 1:
                return None
            _, cond = output[0].chunk(2)
            return (torch.cat([cond, cond]), *output[1:])

        hook = pipe.transformer.register_forward_hook(conditional_only_when_noisier, with_kwargs=True)
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            gens = [torch.Generator(pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
            result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                          generator=gens, output_type="np", use_resolution_binning=False,
                          max_sequence_length=pipe.tokenizer.model_max_length, clean_caption=False)
            out.append(np.clip(np.round(result.images * 255), 0, 255).astype(np.uint8))
    finally:
        if hook is not None:
            hook.remove()
    return np.concatenate(out)
