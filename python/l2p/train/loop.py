"""The training run: source -> convert_to_pixel -> set_trainable -> the source's objective on
pixels, with checkpoints that resume exactly.

Exactness: every random draw of a step (each sample's time, noise and caption-dropout coin)
comes from a generator seeded by (seed, step, the sample's slot in the global batch), the data
order is a seeded permutation per epoch with its position checkpointed, the LR is a pure
function of the step, and optimizer, EMA and RNG states are saved bit-exactly. A run resumed
from step k therefore repeats what the uninterrupted run did after step k, and K processes with
the same global batch draw what one process draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from l2p.atomic import write_text
from l2p.train.ema import EMA
from l2p.sample.schedule import scheduler_config_with_shift
from l2p.train import checkpoint as ckpt
from l2p.train import conditioning as condmod
from l2p.train.align import SourceAlignment
from l2p.train.config import Config, ConfigError
from l2p.train.data import (BatchPlan, DataPosition, collate, dataset_digest, local_batches, open_dataset,
                            sample_seed)
from l2p.train.distributed import (DistEnv, all_reduce_sum, check_shared_folder, init_distributed,
                                   pick_device, reshard, shutdown_distributed, wrap_ddp, wrap_fsdp)
from l2p.train.objective import Objective
from l2p.train.source import encode_latents, open_source


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    output_dir: Path | None = None
    final_dir: Path | None = None
    # Frozen blocks whose weights lived in host memory (low_memory.cpu_offload).
    offloaded_blocks: int = 0


def _nonfinite_inputs(micro: "MicroBatch") -> str:
    """Which inputs of a micro-batch hold NaN or inf ("" if none), to say where a non-finite
    loss came from: the images, the noise or the conditioning (an embedding cache, the text
    encoders)."""
    found = [name for name, t in (("images", micro.x0), ("noise", micro.noise)) if not torch.isfinite(t).all()]
    for name, value in micro.cond.items():
        tensors = value if isinstance(value, (list, tuple)) else [value]
        if any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
            found.append(f"conditioning {name!r}")
    return ", ".join(found)


class MicroBatch(NamedTuple):
    """One micro-batch as the loss takes it: clean images, conditioning (after caption
    dropout), each sample's time and noise and, with align on, the noise of its source latent."""

    x0: torch.Tensor
    cond: dict
    times: torch.Tensor
    noise: torch.Tensor
    source_noise: torch.Tensor | None = None


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then constant or
    cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    o, total = cfg.optim, cfg.train.max_steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _check_fitted_embedding_trains(model, policy) -> None:
    """model.embed_init=vae changes the pixel embedding away from the conversion's: it must be
    among the trainable tensors, which are all that the deltas (and, under FSDP, the exported
    pipeline, merged from them onto a fresh conversion) carry of the trained model."""
    embed = {id(p) for p in model.pixel_embed.parameters()}
    frozen = [n for n, p in model.named_parameters() if id(p) in embed and not p.requires_grad]
    if frozen:
        raise ConfigError(f"model.embed_init=vae fits the pixel embedding, but model.trainable={policy} leaves "
                          f"{', '.join(frozen)} frozen: the deltas hold only trainable tensors, so the fitted "
                          "embedding would be lost from them (and from the exported pipeline under FSDP). Add "
                          f"{frozen[0].rsplit('.', 1)[0]}.* to model.trainable, or set model.embed_init=random")


def _checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv | None = None):
        from l2p.conversion import convert_to_pixel, set_trainable
        from l2p.conversion.delta import base_fingerprint

        self.cfg = cfg
        self.env = env or DistEnv.from_torchrun()
        self.device = pick_device(cfg.train.device, self.env)
        init_distributed(self.env, self.device, cfg.distributed.backend, cfg.distributed.timeout_minutes)
        self.out = Path(cfg.train.output_dir)
        if self.env.enabled:
            check_shared_folder(self.out, self.env, self.device)
        # FSDP2 runs in any process group, one process included (torchrun --nproc-per-node 1).
        self.fsdp = self.env.has_process_group and cfg.distributed.strategy == "fsdp"
        if cfg.low_memory.cpu_offload and not self.fsdp:
            raise ConfigError("low_memory.cpu_offload needs FSDP2 under torchrun: start the run with "
                              "torchrun --nproc-per-node N -m l2p.train (N = 1 for one GPU) and "
                              "distributed.strategy=fsdp")

        use_bf16 = cfg.train.mixed_precision == "bf16" or (
            cfg.train.mixed_precision == "auto" and self.device.type == "cuda")
        if cfg.low_memory.enabled:
            use_bf16 = True  # frozen bf16 weights need autocast
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        # -- source and pixel model ------------------------------------------------------
        self.source = open_source(cfg.model.source)
        # Low-memory mode reads the source in the frozen dtype (no full fp32 copy in host
        # memory) and upcasts only what trains; new layers are then initialised in that dtype.
        frozen_dtype = getattr(torch, cfg.low_memory.frozen_dtype) \
            if cfg.low_memory.enabled else torch.float32
        source_transformer = self.source.load_transformer(frozen_dtype)
        transformer = source_transformer
        if cfg.model.init == "random":
            # Same class and config, fresh weights: the from-scratch baseline.
            torch.manual_seed(cfg.model.init_seed)
            transformer = type(transformer).from_config(transformer.config).to(frozen_dtype)
        patch_size, head = cfg.model.patch_size, self._head_config()
        if cfg.model.published_l2p is not None:
            from l2p.conversion.published_l2p import published_layout

            patch_size, head = published_layout(cfg.model.published_l2p)
        model = convert_to_pixel(transformer, vae_scale_factor=self.source.vae_scale_factor,
                                 patch_size=patch_size, head=head, seed=cfg.model.init_seed)
        del transformer
        published_rounded = False
        if cfg.model.published_l2p is not None:
            from l2p.conversion.published_l2p import load_published_l2p

            published = load_published_l2p(model, cfg.model.published_l2p)
            published_rounded = published.rounded > 0
            self._log(str(published))
        self.trainable_report = set_trainable(model, cfg.model.trainable)
        if cfg.model.embed_init == "vae":
            _check_fitted_embedding_trains(model, cfg.model.trainable)
        # The frozen tensors' fingerprint, which the deltas record so that l2p merge refuses
        # another base: taken now, before FSDP shards them. None (the delta then merges with
        # a warning) where the frozen tensors are not the stored values, a wider source (or
        # published checkpoint) read in low_memory.frozen_dtype: the rounded values would
        # refuse the run's own base.
        self.base_fingerprint = (base_fingerprint(model) if self.source.loads_exactly(frozen_dtype)
                                 and not published_rounded else None)
        self.dataset = open_dataset(cfg.data.path, cfg.data.resolution, cfg.train.seed,
                                    patch_size=model.config.patch_size, max_aspect=cfg.data.bucket_max_aspect,
                                    caption_column=cfg.data.caption_column)
        # The source's VAE encoder, read once for both things that encode images with it.
        needs_vae = cfg.model.embed_init == "vae" or cfg.align.weight > 0
        vae = self.source.load_vae_encoder(frozen_dtype) if needs_vae else None
        if cfg.model.embed_init == "vae":
            self._fit_pixel_embedding(model, source_transformer, vae)
        # The source's own transformer (convert_to_pixel copied its tensors and left it as it
        # was) and VAE encoder, for the alignment term; otherwise dropped here.
        self.align = self._alignment(model, source_transformer, vae) if cfg.align.weight > 0 else None
        del source_transformer, vae
        self.family = condmod.family_for(model.config.source_class)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 master weights for everything that trains
        blocks = model.blocks()
        trainable_blocks = [b for _, b in blocks if any(p.requires_grad for p in b.parameters())]
        if cfg.model.gradient_checkpointing == "trainable":
            _checkpoint_blocks(trainable_blocks)
        elif cfg.model.gradient_checkpointing == "all":
            _checkpoint_blocks([b for _, b in blocks])
        offload = cfg.low_memory.cpu_offload  # (under FSDP: checked above)
        if not offload:
            model.to(self.device)
        if self.align is not None:
            # Whole on every process, never wrapped or offloaded.
            self.align.to(self.device, frozen_dtype)
        # else fully_shard moves each unit's tensors to the device as it wraps it and copies
        # the offloaded shards back to host memory, so the GPU never holds the whole model.
        model.train()
        self.model = model
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.offloaded_blocks = 0
        if self.fsdp:
            self.offloaded_blocks = wrap_fsdp(model, [b for _, b in blocks], bf16=use_bf16, offload_frozen=offload)
            self.wrapped = model
        elif self.env.enabled:
            self.wrapped = wrap_ddp(model, self.device)
        else:
            self.wrapped = model
        named = dict(model.named_parameters())

        o = cfg.optim
        groups = self._parameter_groups(model)
        # The optimizer's parameter order (group by group) is the order checkpoints name them in.
        self.param_names = [n for group in groups for n in group["names"]]
        self.params = [named[n] for n in self.param_names]
        fused = all(p.is_cuda for p in self.params) and not self.fsdp
        self.optimizer = torch.optim.AdamW(
            [{"params": [named[n] for n in g["names"]]} for g in groups],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None)
        # Kept beside the optimizer, not in its groups: a resumed run takes them from its config.
        self.lr_scales = [g["lr_scale"] for g in groups]
        self.ema = EMA({n: named[n] for n in self.param_names}, cfg.ema.decay, cfg.ema.start_step) \
            if cfg.ema.enabled else None
        self.objective = Objective.from_scheduler_config(self.source.scheduler_config, cfg.objective,
                                                         sign=float(model.output_sign))
        # What the sample grids and the exported pipeline sample with: the source's scheduler,
        # at the trained time shift where objective.shift overrides the source's (a model
        # trained at one shift and sampled at another spends its steps at the wrong noise).
        self.scheduler_config = self.source.scheduler_config
        if cfg.objective.shift is not None and self.objective.kind == "flow":
            self.scheduler_config = scheduler_config_with_shift(self.source.scheduler_config,
                                                                cfg.objective.shift)

        # -- data and text conditioning --------------------------------------------------
        self.plan = BatchPlan(self.dataset, cfg.train.batch_size * cfg.train.grad_accum * self.env.world_size,
                              cfg.train.seed, buckets=cfg.data.bucket_max_aspect is not None)
        self.dataset_digest = dataset_digest(self.dataset)
        self.text = self._text_conditioning()
        self.empty = self.text([""])

        # -- counters --------------------------------------------------------------------
        self.step = 0
        self.position = DataPosition(sampler_seed=cfg.train.seed)
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.last_nonfinite_cause = ""
        self.images_seen = 0
        # The parts of the last step's loss beside the total (global-batch means, by name):
        # with align on, the objective's loss and the alignment term.
        self.loss_parts: dict[str, float] = {}
        self._loader = None
        self._rng_to_restore = None
        self._resume()

    # ------------------------------------------------------------------------------------
    def _parameter_groups(self, model) -> list[dict]:
        """The trainable parameters as optimizer groups: those from the source at optim.lr,
        the new layers at optim.new_layers_lr (one group of all when it is not set)."""
        o = self.cfg.optim
        if o.new_layers_lr is None:
            return [{"names": list(self.param_names), "lr_scale": 1.0}]
        if self.cfg.model.init == "random":
            new = set(self.param_names)  # nothing comes from the source
        else:
            new_layers = model.conversion_report.new_layers()
            new = {n for n in self.param_names if n.rpartition(".")[0] in new_layers}
        groups = [{"names": [n for n in self.param_names if n not in new], "lr_scale": 1.0},
                  {"names": [n for n in self.param_names if n in new], "lr_scale": o.new_layers_lr / o.lr}]
        return [g for g in groups if g["names"]]

    def _alignment(self, model, source_transformer, vae) -> SourceAlignment:
        blocks = model.blocks()
        block = self.cfg.align.block
        if block is None:
            frozen = [i for i, (_, b) in enumerate(blocks) if not any(p.requires_grad for p in b.parameters())]
            if not frozen:
                raise ConfigError(f"align.block=null compares the input of the first frozen block, but "
                                  f"model.trainable={self.cfg.model.trainable} trains all {len(blocks)} blocks: "
                                  f"set align.block to a block index (0..{len(blocks) - 1}), or "
                                  f"align.weight=0 to turn the alignment term off")
            block = frozen[0]
        return SourceAlignment(model, source_transformer, vae, block, self.source.vae_scale_factor,
                               self.cfg.align.noise)

    def _fit_pixel_embedding(self, model, source_transformer, vae) -> None:
        """model.embed_init=vae: the pixel embedding fitted to the source's VAE encoder and latent
        projection on the corpus's first images (every process fits the same). A resumed run
        fits too, and then loads its checkpoint's embedding over it."""
        from l2p.conversion.embedding_init import fit_pixel_embedding

        vae.to(self.device)
        count = min(self.cfg.model.embed_init_images, len(self.dataset))
        batch = 32

        def images():
            for start in range(0, count, batch):
                items = [self.dataset[i]["pixel_values"] for i in range(start, min(start + batch, count))]
                if len({tuple(x.shape) for x in items}) > 1:  # aspect-ratio buckets: one image at a time
                    yield from (x[None].to(self.device) for x in items)
                else:
                    yield torch.stack(items).to(self.device)

        fit = fit_pixel_embedding(model, source_transformer, lambda x: encode_latents(vae, x), images(),
                                  ridge=self.cfg.model.embed_init_ridge)
        self._log(str(fit))

    def _head_config(self):
        m = self.cfg.model
        if m.head_channels or m.head_max_channels:
            if m.head != "detailer":
                raise ConfigError("model.head_channels / head_max_channels apply to the detailer head only")
            if m.head_channels and m.head_max_channels:
                raise ConfigError("give model.head_channels or model.head_max_channels, not both")
            if m.head_channels:
                return {"type": "detailer", "channels": list(m.head_channels)}
            return {"type": "detailer", "max_channels": int(m.head_max_channels)}
        return m.head

    def _text_conditioning(self):
        cfg = self.cfg
        cache_dir = cfg.data.embeddings
        if cache_dir == "auto":
            auto = Path(cfg.data.path) / "embeddings"
            cache_dir = str(auto) if auto.is_dir() else None
        if cache_dir is not None:
            from l2p.train.embedding_cache import open_embedding_cache

            cache = open_embedding_cache(cache_dir)
            cached_class = cache.index.get("source_class")
            if cached_class is not None and cached_class != self.source.transformer_class:
                raise ConfigError(f"the text-embedding cache {cache_dir} holds embeddings of a "
                                  f"{cached_class} source ({cache.source}), not of model.source "
                                  f"{self.source.path} ({self.source.transformer_class}): embed with this "
                                  "source (`l2p data embed`), or set data.embeddings=null")
            recorded = cache.index.get("source_digest")
            if recorded is not None:
                from l2p.data.generate import source_digest

                same = recorded == source_digest(self.source.path)
            else:  # a cache from before digests: only its path to go by
                same = Path(cache.source) == self.source.path.resolve()
            if not same:
                # Not refused: the digest covers every component, and a source whose transformer
                # alone changed (a continued training) has the same text encoders. But another
                # source's text encoders would be a silent mistake.
                self._log(f"warning: the text-embedding cache {cache_dir} was made from {cache.source}, "
                          f"which is not the model now at model.source {self.source.path.resolve()}; "
                          "unless their text encoders are the same, embed again with `l2p data embed` "
                          "or set data.embeddings=null")
            # Checked here rather than when an image is drawn: that could be hours in, and under
            # torchrun on one rank only, which leaves the others waiting on it.
            missing = sorted({f.caption for f in self.dataset.files} - set(cache.captions))
            if missing:
                raise ConfigError(f"{len(missing)} captions of {cfg.data.path} are not in the text-embedding cache "
                                  f"{cache_dir}, e.g. {missing[0][:60]!r}: the dataset changed after `l2p data "
                                  "embed`, or it embedded another caption column (--caption-column, which "
                                  "data.caption_column must name too); run it again, or set data.embeddings=null")
            return cache
        if cfg.low_memory.enabled:
            raise ConfigError("low_memory.enabled needs cached text embeddings (text encoders are never "
                              "loaded): run `l2p data embed --source SRC --data DATA` first, or set "
                              "data.embeddings to the cache folder")
        pipe = self.source.load_text_pipeline(self.device)
        return condmod.TextEncoder(pipe, self.model.config.source_class, self.device)

    def _resume(self) -> None:
        which = self.cfg.train.resume
        if which is None:
            return
        if which == "latest":
            if self.env.is_main:
                ckpt.recover_interrupted_save(self.out)
            ckpt.barrier()
        path = ckpt.latest_checkpoint(self.out) if which == "latest" else Path(which)
        if path is None:
            return  # "latest" with nothing to resume: a fresh run
        loaded = ckpt.load_checkpoint(path, rank=self.env.rank, world_size=self.env.world_size,
                                      fsdp=self.fsdp)
        state = loaded["state"]
        named = dict(self.model.named_parameters())
        if self.fsdp and loaded["whole"]:
            # Whole tensors (another world size, or a checkpoint without FSDP): this rank's part.
            loaded["trainable"] = _shards_of(loaded["trainable"], named, path)
            loaded["optimizer"] = _shards_of(loaded["optimizer"], named, path)
            if loaded["ema"] is not None:
                loaded["ema"] = _shards_of(loaded["ema"], named, path)
        global_batch = self.cfg.train.batch_size * self.cfg.train.grad_accum * self.env.world_size
        if state.get("global_batch", global_batch) != global_batch:
            self._log(f"warning: {path} was trained at a global batch of {state['global_batch']}, this run "
                      f"continues at {global_batch} (batch_size x grad_accum x {self.env.world_size} "
                      "processes); the data order goes on from the same image, the learning-rate "
                      "schedule from the same step")
        recorded = state.get("dataset")
        if recorded is not None and recorded["digest"] != self.dataset_digest:
            # Not refused: data added on purpose is a reason to resume. But the order from here
            # is a permutation of other data: not the one the interrupted run would have read.
            self._log(f"warning: {path} was trained on other data ({recorded['images']} usable images then, "
                      f"{len(self.dataset)} in {self.cfg.data.path} now, or other files or captions); the "
                      "data order goes on from the same position in a new permutation, so images of this "
                      "epoch may be read twice or not at all")
        with torch.no_grad():
            for name in self.param_names:
                if name not in loaded["trainable"]:
                    raise ValueError(f"{path} lacks trainable tensor {name}; resume with the run's own config")
                saved, target = loaded["trainable"][name], _local(named[name])
                if saved.shape != target.shape:
                    raise ValueError(f"{path} holds {name} of shape {tuple(saved.shape)} but this model's is "
                                     f"{tuple(target.shape)}; resume with the run's own config "
                                     f"({self.out / 'config.yaml'})")
                target.copy_(saved)
        opt_tensors = loaded["optimizer"]
        if self.fsdp:
            opt_tensors = _as_dtensors(opt_tensors, named)
        ckpt.optimizer_from_flat(self.optimizer, self.param_names, opt_tensors, loaded["optimizer_meta"])
        # The saved param groups carry the old run's hyperparameters; this run's config rules
        # (the learning rate is set at every step from the schedule).
        o = self.cfg.optim
        for group in self.optimizer.param_groups:
            group.update(weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps)
        if self.ema is not None:
            if loaded["ema"] is not None:
                self.ema.load_state_dict(loaded["ema"])
            else:
                # EMA turned on at resume: average from the resumed weights, not the initial ones.
                self.ema = EMA({n: named[n] for n in self.param_names}, self.cfg.ema.decay,
                               self.cfg.ema.start_step)
                self._log(f"{path} has no EMA weights: the EMA starts from the resumed weights")
        self._set_aside_later_checkpoints(path, int(state["step"]))
        self.step = int(state["step"])
        self.position = DataPosition(**state["position"])
        if self.position.sampler_seed != self.cfg.train.seed:
            self._log(f"warning: {path} was trained with train.seed={self.position.sampler_seed}, this run has "
                      f"{self.cfg.train.seed}: the data order (a new permutation from the same position), noise "
                      "and times from here are drawn from the new seed")
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.images_seen = int(state["images_seen"])
        if loaded["rng"] is not None:
            self._rng_to_restore = (loaded["rng"], loaded["rng_meta"])
        else:
            # Only global-generator draws (none of the noise, times or caption dropout, which are
            # seeded per sample) depend on this.
            self._rng_to_restore = "reseed"
            self._log(f"{path} was written by {state.get('world_size', 1)} processes, this run has "
                      f"{self.env.world_size}: each process seeds its global random generators from "
                      "(train.seed, step, rank)")
        self._log(f"resumed from {path} at step {self.step}")

    def _set_aside_later_checkpoints(self, path: Path, step: int) -> None:
        """Resuming from a checkpoint of this run older than its newest abandons the newer
        ones: move them into ``checkpoints/abandoned-at-step-N/`` so that "latest" and pruning
        see only the history being continued, and nothing is deleted."""
        root = ckpt.checkpoint_root(self.out)
        if path.resolve().parent != root.resolve():
            return
        later = [p for p in ckpt.list_checkpoints(self.out) if ckpt.checkpoint_step(p) > step]
        if later and self.env.is_main:
            aside = root / f"abandoned-at-step-{step:08d}"
            aside.mkdir(exist_ok=True)
            for p in later:
                os.replace(p, aside / p.name)
            self._log(f"resuming from step {step} abandons {', '.join(p.name for p in later)}: moved to {aside}")
        ckpt.barrier()

    def _log(self, message: str) -> None:
        if self.env.is_main:
            print(f"[l2p-train] {message}", flush=True)

    # ------------------------------------------------------------------------------------
    def _attention_backends(self):
        """Forward and backward of a step (checkpointed blocks recompute inside backward) run
        without SDPA's cuDNN backend unless train.cudnn_attention (see the config)."""
        if self.device.type != "cuda" or self.cfg.train.cudnn_attention:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _load(self, indices: list[int]) -> dict:
        if self._loader is None:
            return collate([self.dataset[i] for i in indices])
        batch = next(self._loader)
        if batch["index"] != indices:
            raise RuntimeError(f"data loader out of step: got {batch['index']}, expected {indices}")
        return batch

    def _start_loader(self) -> None:
        """Background loading (data.num_workers > 0) of exactly the micro-batches the steps
        from the current position will take."""
        self._loader = None
        if self.cfg.data.num_workers > 0:
            c, env = self.cfg, self.env
            plan = local_batches(self.plan, self.position, c.train.batch_size, c.train.grad_accum,
                                 env.world_size, env.rank)
            # Its own generator: a loader draws its workers' base seed when it starts, and from
            # the global generator that draw would shift every later dropout mask of a resumed
            # run by one (the batches themselves never depend on it).
            self._loader = iter(torch.utils.data.DataLoader(
                self.dataset, batch_sampler=plan, num_workers=c.data.num_workers, collate_fn=collate,
                persistent_workers=False, prefetch_factor=2,
                generator=torch.Generator().manual_seed(c.train.seed)))

    def _micro_batch(self, step: int, slots: list[int], batch: dict):
        """Conditioning (after caption dropout), times, noise of one loaded micro-batch."""
        x0 = batch["pixel_values"]
        p = self.model.config.patch_size
        seq_len = (x0.shape[-2] // p) * (x0.shape[-1] // p)
        times, keep, noise, source_noise = [], [], [], []
        for slot in slots:
            g = torch.Generator().manual_seed(sample_seed(self.cfg.train.seed, step, slot))
            times.append(self.objective.sample_time(g, seq_len))
            keep.append(torch.rand((), generator=g).item() >= self.cfg.data.caption_dropout)
            noise.append(torch.randn(x0.shape[1:], generator=g))
            if self.align is not None:
                source_noise.append(self.align.source_noise(noise[-1], g))
        dtype = torch.float64 if self.objective.kind == "flow" else torch.long
        times = torch.tensor(times, dtype=dtype)
        cond = condmod.select(self.text(batch["text"]), torch.tensor(keep), self.empty)
        return MicroBatch(x0, cond, times, torch.stack(noise), torch.stack(source_noise) if source_noise else None)

    def _loss(self, x0, cond, times, noise, source_noise=None) -> torch.Tensor:
        """The loss of one micro-batch (``MicroBatch``'s fields)."""
        return self._loss_and_parts(x0, cond, times, noise, source_noise)[0]

    def _loss_and_parts(self, x0, cond, times, noise, source_noise=None) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch and, with align on, its parts: the objective's loss
        and the alignment term (loss = objective_loss + align.weight x align)."""
        dev = self.device
        # Times, noise and conditioning are drawn on the CPU (seeded per sample, so they do not
        # depend on the device or the world size) and move to the device here.
        x0, noise, times = x0.to(dev), noise.to(dev), times.to(dev)
        x_t, target = self.objective.noisy_and_target(x0, noise, times)
        model_times = self.objective.scheduler_timesteps(times).to(dev)
        cond = condmod.to_device(cond, dev, torch.float32)  # cached/encoded in bf16 on GPUs
        kwargs = self.family.call(cond, x_t, model_times, self.model, self.cfg.objective.guidance)
        tap = self.align.pixel_block_input() if self.align is not None else contextlib.nullcontext()
        with tap as pixel_hidden, self._autocast():
            pred = self.wrapped(**kwargs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        if self.align is None:
            return loss, {}
        if source_noise is None:
            raise ValueError("with align.weight > 0 the loss takes the micro-batch's source_noise "
                             "(MicroBatch.source_noise, drawn by _micro_batch)")
        if len(pixel_hidden) != 1:
            raise RuntimeError(f"{self.align.block_name} ran {len(pixel_hidden)} times in one forward")
        source_hidden = self.align.source_block_input(x0, source_noise, times, kwargs, self.objective,
                                                      self._autocast)
        term = self.align.term(pixel_hidden[0], source_hidden, x0, kwargs)
        return loss + self.cfg.align.weight * term, {"objective_loss": loss, "align": term}

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step (all micro-batches). Returns (loss, grad_norm, finite)."""
        cfg, env = self.cfg, self.env
        B, A, W = cfg.train.batch_size, cfg.train.grad_accum, env.world_size
        indices, next_position = self.plan.take(self.position)
        lr = lr_at(cfg, self.step)
        for group, scale in zip(self.optimizer.param_groups, self.lr_scales):
            group["lr"] = lr * scale
        loss_sum = torch.zeros((), dtype=torch.float64)
        part_sums: dict[str, torch.Tensor] = {}
        nonfinite_cause = None
        for a in range(A):
            start = a * B * W + env.rank * B
            slots = list(range(start, start + B))
            batch = self._load([indices[s] for s in slots])
            micro = self._micro_batch(self.step, slots, batch)
            sync = a == A - 1 or not env.enabled or self.fsdp
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with ctx, self._attention_backends():
                loss, parts = self._loss_and_parts(*micro)
                (loss / A).backward()
            loss_value = loss.detach().double().cpu()
            loss_sum += loss_value
            if nonfinite_cause is None and not math.isfinite(loss_value.item()):
                nonfinite_cause = _nonfinite_inputs(micro) or "the model's output (its inputs were finite)"
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value.detach().double().cpu()
        # The mean loss (and parts) over the global batch; non-finite on any rank -> skipped everywhere.
        sums = all_reduce_sum(torch.stack([loss_sum, *part_sums.values()]).to(self.device)).cpu()
        total = sums[0].item() / (A * W)
        self.loss_parts = {name: sums[i].item() / (A * W) for i, name in enumerate(part_sums, start=1)}
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite = math.isfinite(total) and math.isfinite(grad_norm)
        if not finite:
            self.last_nonfinite_cause = nonfinite_cause or (
                "another process's loss" if not math.isfinite(total) else "the gradient (the loss was finite)")
        if finite:
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.position = next_position
        self.step += 1
        self.images_seen += B * A * W
        if finite and self.ema is not None:
            self.ema.update(self.step - self.skipped_steps)
        if not finite and self.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss or gradient was not finite for {self.consecutive_nonfinite} steps in a row "
                f"(the last at step {self.step}; {self.skipped_steps} skipped in all; non-finite in the "
                f"last one: {self.last_nonfinite_cause}). Try a lower "
                f"optim.lr or more optim.warmup_steps, train.mixed_precision=no (fp32)"
                + (", train.cudnn_attention=false" if self.cfg.train.cudnn_attention else "")
                + ", or check the data for broken images.")
        return total, grad_norm, finite

    # ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "position": self.position.to_dict(), "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite, "images_seen": self.images_seen,
                "lr_schedule": {"kind": self.cfg.optim.schedule, "base_lr": self.cfg.optim.lr,
                                "warmup_steps": self.cfg.optim.warmup_steps,
                                "max_steps": self.cfg.train.max_steps,
                                "last_lr": lr_at(self.cfg, max(self.step - 1, 0))},
                "world_size": self.env.world_size,
                "global_batch": self.cfg.train.batch_size * self.cfg.train.grad_accum * self.env.world_size,
                "dataset": {"images": len(self.dataset), "digest": self.dataset_digest}}

    def _open_metrics(self):
        """metrics.jsonl (one JSON record per step), without records past the current step
        (a killed run's steps after its last checkpoint are redone)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            write_text(path, "".join(line + "\n" for line in kept))
        return open(path, "a")

    def save_checkpoint(self) -> Path:
        named = dict(self.model.named_parameters())
        trainable = {n: _local(named[n]).detach() for n in self.param_names}
        return ckpt.save_checkpoint(
            self.out, self.step, rank=self.env.rank, trainable=trainable,
            ema=self.ema.state_dict() if self.ema is not None else None, optimizer=self.optimizer,
            param_names=self.param_names, state=self.state(), keep_last=self.cfg.checkpoint.keep_last,
            sharded=self.fsdp)

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        if cfg.train.resume is None and (found := ckpt.latest_checkpoint(self.out)) is not None:
            # Its pruning would delete the fresh run's own early checkpoints (the old ones are
            # newer by step), and a later resume=latest would continue the old run.
            raise ConfigError(f"{self.out} already holds checkpoints of a run (newest {found.name}): set "
                              "train.resume=latest to continue it, or choose another train.output_dir")
        result = TrainResult(step=self.step, output_dir=self.out, offloaded_blocks=self.offloaded_blocks)
        writer = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            self._log(str(self.trainable_report))
            if self.offloaded_blocks:
                self._log(f"{self.offloaded_blocks} frozen blocks kept in host memory (FSDP2 CPUOffloadPolicy)")
            if self.align is not None:
                self._log(f"align: {cfg.align.weight} x (1 - cosine) with the source's hidden states entering "
                          f"{self.align.block_name} ({cfg.align.noise} source noise)")
            if cfg.logging.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    # purge_step drops the scalars a killed run logged past its last checkpoint.
                    writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
                except ImportError:
                    self._log("tensorboard is not installed; scalars go to metrics.jsonl only")
        if self._rng_to_restore == "reseed":
            ckpt.seed_rng(cfg.train.seed, self.step, env.rank)
        elif self._rng_to_restore is not None:
            ckpt.set_rng_state(*self._rng_to_restore)
        else:
            torch.manual_seed(cfg.train.seed + env.rank)
        self._rng_to_restore = None
        self._start_loader()
        progress = None
        if env.is_main and cfg.logging.progress_bar:
            from tqdm.auto import tqdm
            progress = tqdm(total=cfg.train.max_steps, initial=self.step, desc="l2p-train", unit="step",
                            dynamic_ncols=True)
        metrics = self._open_metrics() if env.is_main else None
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * env.world_size
        window_loss, window_parts, window_n, t0 = 0.0, {}, 0, time.perf_counter()
        try:
            while self.step < cfg.train.max_steps:
                loss, grad_norm, finite = self.train_step()
                result.losses.append(loss)
                if finite:
                    window_loss, window_n = window_loss + loss, window_n + 1
                    for name, value in self.loss_parts.items():
                        window_parts[name] = window_parts.get(name, 0.0) + value
                if env.is_main:
                    record = {"step": self.step, "loss": loss, **self.loss_parts, "grad_norm": grad_norm,
                              "lr": lr_at(cfg, self.step - 1), "skipped": not finite}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if progress is not None:
                        shown = {"align": f"{self.loss_parts['align']:.4f}"} if "align" in self.loss_parts else {}
                        progress.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{record['lr']:.2e}",
                                             skipped=self.skipped_steps, refresh=False)
                        progress.update(1)
                    if writer is not None and (self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps):
                        elapsed = time.perf_counter() - t0
                        if window_n:
                            writer.add_scalar("train/loss", window_loss / window_n, self.step)
                            for name, value in window_parts.items():
                                writer.add_scalar(f"train/{name}", value / window_n, self.step)
                        writer.add_scalar("train/lr", record["lr"], self.step)
                        if cfg.optim.new_layers_lr is not None:
                            new_lr = record["lr"] * cfg.optim.new_layers_lr / cfg.optim.lr
                            writer.add_scalar("train/lr_new_layers", new_lr, self.step)
                        writer.add_scalar("train/grad_norm", grad_norm, self.step)
                        images_per_s = global_batch * max(window_n, 1) / max(elapsed, 1e-9)
                        writer.add_scalar("train/images_per_s", images_per_s, self.step)
                        writer.add_scalar("train/peak_memory_gb", _peak_memory_gb(self.device), self.step)
                        writer.add_scalar("train/skipped_steps", self.skipped_steps, self.step)
                        window_loss, window_parts, window_n, t0 = 0.0, {}, 0, time.perf_counter()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.max_steps:
                    self.save_checkpoint()
                if cfg.sample.every and cfg.sample.prompts and self.step % cfg.sample.every == 0:
                    self.sample_grid(f"step-{self.step:08d}")
            self.save_checkpoint()
            result.final_dir = self.export()
            if cfg.sample.prompts:
                self.sample_grid("final")
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        result.step, result.skipped_steps = self.step, self.skipped_steps
        return result

    # ------------------------------------------------------------------------------------
    def export(self) -> Path | None:
        """``final/pipeline``: the source pipeline converted to pixel space (no VAE; what
        ``l2p convert`` writes) with the trained transformer, EMA weights when EMA is on;
        ``final/delta.safetensors``: its trainable tensors; ``final/delta-raw.safetensors``:
        the raw (non-averaged) trainable tensors. Under FSDP every rank joins the gathers of
        the sharded tensors and rank 0 merges them onto a fresh conversion of the source, as
        a low_memory run does too (its frozen tensors are rounded copies)."""
        import shutil

        from l2p.conversion import convert_folder, merge_folder
        from l2p.conversion.delta import BASE_FINGERPRINT, DELTA_FORMAT, _config_json, atomic_save_file

        final = self.out / "final"
        if self.fsdp:
            reshard(self.model)
            named = dict(self.model.named_parameters())
            # Every rank joins each gather (a collective); only rank 0 keeps the whole tensors,
            # so the others never hold a full copy of the trainable set in host memory.
            keep = self.env.is_main
            raw, averaged = {}, {}
            for n in self.param_names:
                whole = _full(named[n]).detach()
                if keep:
                    raw[n] = whole.cpu()
            if self.ema is None:
                averaged = raw
            else:
                for n, shard in self.ema.shadow.items():
                    whole = _full(_like(named[n], shard)).detach()
                    if keep:
                        averaged[n] = whole.cpu()
        if not self.env.is_main:
            return None
        if not self.fsdp:
            def trainable() -> dict[str, torch.Tensor]:
                # Copies: on the CPU .cpu() would alias the parameters, which the EMA swap overwrites.
                return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                        if p.requires_grad}

            raw = trainable()
            with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
                averaged = trainable()
        final.mkdir(parents=True, exist_ok=True)
        pipeline = final / "pipeline"
        shutil.rmtree(pipeline, ignore_errors=True)
        # The trained tensors are merged onto a fresh conversion, the way `l2p merge` does it,
        # where the run does not hold the source's frozen tensors as the source stores them:
        # under FSDP no rank holds the whole model, and under low_memory they are rounded to
        # low_memory.frozen_dtype (the export must be the source + the delta, as `l2p merge`
        # writes it, not a bf16 copy of a float32 source).
        merged = self.fsdp or self.cfg.low_memory.enabled
        converted = final / ".pipeline-unmerged" if merged else pipeline
        shutil.rmtree(converted, ignore_errors=True)
        convert_folder(self.source.path, converted, patch_size=self.cfg.model.patch_size,
                       head=self._head_config(), seed=self.cfg.model.init_seed,
                       published_l2p=self.cfg.model.published_l2p, log=self._log)
        if self.scheduler_config is not self.source.scheduler_config:
            write_text(converted / "scheduler" / "scheduler_config.json",
                       json.dumps(self.scheduler_config, indent=2, sort_keys=True) + "\n")
        metadata = {"format": DELTA_FORMAT, "config": _config_json(self.model)}
        if self.base_fingerprint is not None:
            metadata[BASE_FINGERPRINT] = self.base_fingerprint
        atomic_save_file({k: v.contiguous() for k, v in raw.items()}, final / "delta-raw.safetensors", metadata)
        atomic_save_file({k: v.contiguous() for k, v in averaged.items()}, final / "delta.safetensors", metadata)
        if merged:
            # The trained tensors are written as trained (float32 over a bf16 source's bf16
            # frozen ones), as the single-process export saves them; not rounded to the source's.
            merge_folder(converted, final / "delta.safetensors", pipeline, log=self._log)
            shutil.rmtree(converted, ignore_errors=True)
            return final
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            self.model.save_pretrained(str(pipeline / "transformer"), safe_serialization=True)
        return final

    def sample_grid(self, name: str) -> Path | None:
        """Render the configured prompts x seeds through the pixel sampler to a PNG grid.
        Under FSDP every rank runs the sampler (each forward gathers the sharded blocks) and
        rank 0 writes the grid."""
        if not self.env.is_main and not self.fsdp:
            return None
        from l2p.sample.basic import sample_images, save_grid

        s = self.cfg.sample
        res = s.resolution or self.cfg.data.resolution
        prompts = list(s.prompts)
        try:
            cond = self.text(prompts)
        except KeyError as exc:  # a sample prompt missing from the embedding cache
            self._log(f"no sample grid: {exc.args[0]}")
            return None
        images = []
        ctx = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        self.model.eval()
        try:
            with ctx, self._autocast():
                for seed in s.seeds:
                    images.append(sample_images(
                        self.model, cond, self.empty, scheduler_config=self.scheduler_config,
                        steps=s.steps, guidance=s.guidance, seed=seed, height=res, width=res,
                        flow_guidance=self.cfg.objective.guidance))
        finally:
            self.model.train()
            if self.fsdp:
                reshard(self.model)
        if not self.env.is_main:
            return None
        path = self.out / "samples" / f"{name}.png"
        # rows: prompts, columns: seeds
        save_grid(torch.stack(images, dim=1).flatten(0, 1), path, columns=len(s.seeds))
        return path


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _like(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """``shard`` (this rank's piece of an FSDP2 parameter) as a DTensor laid out like ``param``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return shard
    return DTensor.from_local(shard.to(param.device), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())


def _shards_of(tensors: dict[str, torch.Tensor], named: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Whole checkpoint tensors -> this rank's FSDP2 shards (plain tensors, laid out as
    ``to_local()`` of their parameter). Keys are parameter names, or "<name>/<optimizer state>";
    0-dim tensors (AdamW's step) are kept whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for key, value in tensors.items():
        param = named[key] if key in named else named.get(key.rpartition("/")[0])
        if isinstance(param, DTensor) and value.dim() > 0:
            if value.shape != param.shape:
                raise ValueError(f"{path} holds {key} of shape {tuple(value.shape)} but this model's is "
                                 f"{tuple(param.shape)}; resume with the run's own config")
            # Every rank holds the whole tensor: no scatter (src_data_rank=None). It moves to the
            # mesh's device type on its own.
            value = distribute_tensor(value, param.device_mesh, param.placements,
                                      src_data_rank=None).to_local().cpu()
        out[key] = value
    return out


def _as_dtensors(tensors: dict[str, torch.Tensor], named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Optimizer state shards saved as plain tensors -> DTensors laid out like their params."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in tensors.items():
        name = key.rpartition("/")[0]
        param = named[name]
        if isinstance(param, DTensor) and value.dim() > 0:
            value = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride())
        out[key] = value
    return out


def train(cfg: Config, env: DistEnv | None = None) -> TrainResult:
    try:
        result = Trainer(cfg, env).run()
    except BaseException:
        # No waiting for the other ranks here: they may never get to the end (torchrun stops
        # them once this one has failed).
        shutdown_distributed()
        raise
    shutdown_distributed(wait_for_peers=True)
    return result
