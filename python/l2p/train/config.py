"""The trainer's one typed configuration: nested dataclasses, read from YAML, overridden with
``--set section.key=value``, written back as YAML next to every run.

Unknown keys are errors that name the nearest valid key, and values are checked against the
field types, so a typo in a long run's config fails in the first second, not after an hour.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config a user wrote that the trainer cannot run; the message says how to fix it."""


@dataclass
class ModelConfig:
    # A diffusers pipeline folder, a transformer folder, or "toy" (the built-in ShapesWorld source).
    source: str = "toy"
    # Pixel patch size; None = latent patch x VAE factor (keeps the source's token grid).
    patch_size: int | None = None
    head: str = "detailer"
    # Detailer Head encoder widths, one per level (log2 P levels); empty = the defaults
    # (64, 128, 256, 512 at P = 16).
    head_channels: list[int] = field(default_factory=list)
    # Or only the widest (bottleneck) width, the levels above halving: 128 at P=8 gives
    # 32, 64, 128. None = 512, the official heads.
    head_max_channels: int | None = None
    # Which parameters train: "first_last:N", "all", or comma-separated name patterns.
    trainable: str = "first_last:5"
    # Seed of the freshly initialised layers (pixel embedding, head).
    init_seed: int = 0
    # "source": the transformer starts from the source's weights (L2P). "random": the same
    # pixel architecture from random initialisation (the from-scratch baseline); every
    # parameter must then train (model.trainable=all).
    init: str = "source"
    # Where the pixel patch embedding starts: "random" (nn.Conv2d's initialisation, the paper's)
    # or "vae": the source's VAE encoder, fitted per patch by ridge regression on the first
    # embed_init_images corpus images, composed with the source's latent patch projection, so
    # the transferred blocks start from tokens like their own (l2p.conversion.embedding_init).
    embed_init: str = "random"
    embed_init_images: int = 512
    # Added to the pixel patches' covariance (pixels in [-1, 1]) before solving.
    embed_init_ridge: float = 0.1
    # Recompute block activations in the backward pass: "none", "trainable" or "all" blocks.
    gradient_checkpointing: str = "none"
    # A published L2P checkpoint of model.source (Z-Image L2P; a .safetensors file or a folder of
    # shards) to continue training from: the pixel model takes its weights, patch and decoder
    # layout (l2p.conversion.published_l2p), and the export converts with it.
    published_l2p: str | None = None


@dataclass
class DataConfig:
    # Images folder with metadata.csv (file_name,text), e.g. the output of `l2p data generate`.
    path: str = ""
    resolution: int = 64
    # Aspect-ratio buckets of about resolution^2 pixels with aspect ratios up to this (e.g. 2.0);
    # None = square center crops. A global batch always holds one bucket.
    bucket_max_aspect: float | None = None
    # Probability that a sample's caption is replaced by the empty prompt (for CFG).
    caption_dropout: float = 0.1
    # metadata.csv column holding the captions; None = the first of text, caption, prompt (the
    # same choice as `l2p data embed --caption-column`, which must name the same column).
    caption_column: str | None = None
    # Text-embedding cache of `l2p data embed`; "auto" = use <path>/embeddings when present.
    embeddings: str | None = "auto"
    # DataLoader worker processes that prefetch exactly the coming batches (0 = load in the loop).
    num_workers: int = 0


@dataclass
class ObjectiveConfig:
    # "auto" = the source's own: flow matching for flow schedulers, else the scheduler's
    # prediction_type ("epsilon" or "v_prediction").
    prediction: str = "auto"
    # Density of the flow time s in (0, 1) before the shift: "uniform" or "logit_normal".
    timestep_density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Time shift k in s' = k s / (1 + (k-1) s). None = the source scheduler's (static shift or
    # dynamic shift from the image sequence length). A value also goes into the exported
    # pipeline's scheduler config (dynamic shifting off), so the model samples at it.
    shift: float | None = None
    # Guidance value fed to guidance-distilled sources (FLUX-dev's guidance embedding; 3.5 as
    # in the diffusers FLUX training examples). Ignored by sources without one.
    guidance: float = 3.5


@dataclass
class OptimConfig:
    # Learning rate of the weights that come from the source.
    lr: float = 5e-5
    # Learning rate of the layers that do not: the pixel patch embedding and the head that
    # convert_to_pixel initialises (every layer with model.init=random). None = lr. Fresh
    # layers want a far larger rate than transferred blocks, which a large rate overwrites.
    new_layers_lr: float | None = None
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # "cosine" (to min_lr_ratio * lr) or "constant", both after a linear warmup.
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value; 0 disables clipping.
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/l2p"
    max_steps: int = 1000
    # Per-process micro-batch; the global batch is batch_size x grad_accum x world size.
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    # "auto" = bf16 autocast on GPUs, fp32 on the CPU; or "no" / "bf16".
    mixed_precision: str = "auto"
    # Stop after this many non-finite steps in a row (each one is skipped and counted).
    max_nonfinite_steps: int = 5
    # Let torch's SDPA pick its cuDNN backend in training on GPUs. Off by default: its backward
    # gave non-finite gradients (finite loss) to tiny FLUX in bf16 on an H200 with torch 2.11,
    # where the flash / memory-efficient / math backends are finite, and such bugs are reported
    # for other shapes (e.g. pytorch/pytorch#196678). It is the fastest backend on Hopper:
    # turn it on where a run has shown finite gradients with it.
    cudnn_attention: bool = False
    # "latest" (newest checkpoint in output_dir, if any), a checkpoint folder, or None.
    resume: str | None = None
    device: str = "auto"


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    # Start averaging after this many optimizer steps (a copy of the weights until then).
    start_step: int = 0


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 3


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class SampleConfig:
    # Render a prompt x seed grid every N steps (0 = never; the final model is always sampled
    # when prompts are given).
    every: int = 0
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    guidance: float = 4.5
    # Output size; None = data.resolution.
    resolution: int | None = None


@dataclass
class DistributedConfig:
    # "ddp" or "fsdp" (FSDP2 fully_shard per block, then the root; frozen blocks included).
    strategy: str = "ddp"
    # None = nccl on GPUs, gloo on the CPU.
    backend: str | None = None
    # How long a collective waits for a rank that does not arrive before the run fails (a rank
    # that died on another node); long enough for the slowest checkpoint write or export.
    timeout_minutes: float = 30.0


@dataclass
class LowMemoryConfig:
    # Cached text embeddings only (text encoders never loaded) and frozen blocks in bf16.
    enabled: bool = False
    frozen_dtype: str = "bfloat16"
    # Frozen blocks live in host memory and are copied to the GPU block by block, in the
    # forward and again in the backward (FSDP2's CPUOffloadPolicy on their units). Needs
    # distributed.strategy=fsdp under torchrun; one process is enough.
    cpu_offload: bool = False


@dataclass
class AlignConfig:
    # Weight of the source-feature alignment term added to the loss: 1 - cosine similarity
    # between the pixel model's hidden states entering block `block` and the source
    # transformer's for the same image (its VAE latent, noised at the same time). 0 = off: the
    # source's VAE and transformer are then not loaded.
    weight: float = 0.0
    # The block whose input is compared, counted from 0 as model.trainable counts blocks (FLUX:
    # the double-stream blocks, then the single-stream ones). None = the first block with no
    # trainable parameter: N of model.trainable=first_last:N.
    block: int | None = None
    # The source's latent noise: "independent" (drawn on its own) or "coupled" (the lowest
    # spatial frequencies of the sample's pixel noise, align.coupled_source_noise). Independent
    # noise makes the target at high noise the source's reaction to a draw the pixel model
    # cannot see, so the pixel model can only learn its average; coupled noise lets it see the
    # draw the source commits to.
    noise: str = "independent"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    low_memory: LowMemoryConfig = field(default_factory=LowMemoryConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the YAML atomically: a resumed run rewrites its run's config.yaml, which
        ``l2p-train --resume RUN_DIR`` reads; a write that fails (a full disk) or is killed
        leaves the old file."""
        from l2p.atomic import write_text

        write_text(path, self.to_yaml())

    def validate(self) -> "Config":
        _check_choice("model.gradient_checkpointing", self.model.gradient_checkpointing,
                      ("none", "trainable", "all"))
        _check_choice("model.init", self.model.init, ("source", "random"))
        _check_choice("model.embed_init", self.model.embed_init, ("random", "vae"))
        if self.model.embed_init == "vae":
            if self.model.init != "source":
                raise ConfigError("model.embed_init=vae starts the pixel embedding from the source's VAE and "
                                  "latent projection, which a from-scratch run (model.init=random) must not "
                                  "use: set model.embed_init=random")
            if self.model.embed_init_images < 1:
                raise ConfigError(f"model.embed_init_images must be >= 1, got {self.model.embed_init_images}")
            if not self.model.embed_init_ridge >= 0:
                raise ConfigError(f"model.embed_init_ridge must be >= 0, got {self.model.embed_init_ridge}")
        if self.model.published_l2p is not None:
            given = [name for name, value in (
                ("model.init=random", self.model.init == "random"),
                ("model.embed_init=vae", self.model.embed_init == "vae"),
                ("model.patch_size", self.model.patch_size is not None),
                ("model.head_channels", bool(self.model.head_channels)),
                ("model.head_max_channels", self.model.head_max_channels is not None),
                ("model.head", self.model.head != "detailer")) if value]
            if given:
                raise ConfigError(f"model.published_l2p brings its own weights, patch and decoder: leave "
                                  f"{', '.join(given)} at the default")
        if self.model.init == "random" and self.model.trainable != "all":
            raise ConfigError("model.init=random leaves frozen blocks random: set model.trainable=all "
                              f"(got {self.model.trainable!r})")
        _check_choice("objective.prediction", self.objective.prediction,
                      ("auto", "flow", "epsilon", "v_prediction"))
        _check_choice("objective.timestep_density", self.objective.timestep_density,
                      ("uniform", "logit_normal"))
        _check_choice("optim.schedule", self.optim.schedule, ("cosine", "constant"))
        _check_choice("train.mixed_precision", self.train.mixed_precision, ("auto", "no", "bf16"))
        _check_choice("distributed.strategy", self.distributed.strategy, ("ddp", "fsdp"))
        _check_choice("low_memory.frozen_dtype", self.low_memory.frozen_dtype,
                      ("bfloat16", "float16", "float32"))
        if self.low_memory.cpu_offload and self.distributed.strategy != "fsdp":
            raise ConfigError("low_memory.cpu_offload runs on FSDP2: set distributed.strategy=fsdp and start "
                              "the run with torchrun (torchrun --nproc-per-node 1 for one GPU)")
        for name, value, low in [
            ("train.max_steps", self.train.max_steps, 1),
            ("train.batch_size", self.train.batch_size, 1),
            ("train.grad_accum", self.train.grad_accum, 1),
            ("train.max_nonfinite_steps", self.train.max_nonfinite_steps, 1),
            ("checkpoint.keep_last", self.checkpoint.keep_last, 1),
            ("checkpoint.every", self.checkpoint.every, 0),
            ("data.resolution", self.data.resolution, 1),
            ("logging.every", self.logging.every, 1),
            ("optim.warmup_steps", self.optim.warmup_steps, 0),
            ("sample.every", self.sample.every, 0),
            ("sample.steps", self.sample.steps, 1),
        ]:
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if not self.distributed.timeout_minutes > 0:
            raise ConfigError(f"distributed.timeout_minutes must be > 0, got {self.distributed.timeout_minutes}")
        if self.data.bucket_max_aspect is not None and self.data.bucket_max_aspect < 1.0:
            raise ConfigError(f"data.bucket_max_aspect must be >= 1 (or null), got {self.data.bucket_max_aspect}")
        if not 0.0 <= self.data.caption_dropout <= 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1], got {self.data.caption_dropout}")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.ema.decay}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (the cosine schedule's floor as a "
                              f"fraction of optim.lr), got {self.optim.min_lr_ratio}")
        if not self.optim.grad_clip >= 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 turns clipping off), got {self.optim.grad_clip}")
        if self.sample.prompts and not self.sample.seeds:
            raise ConfigError("sample.prompts are set but sample.seeds is empty: give at least one seed "
                              "(sample.seeds=[0])")
        if self.optim.new_layers_lr is not None and self.optim.new_layers_lr <= 0:
            raise ConfigError(f"optim.new_layers_lr must be > 0 (or null: the same as optim.lr), "
                              f"got {self.optim.new_layers_lr}")
        if not (math.isfinite(self.align.weight) and self.align.weight >= 0):
            raise ConfigError(f"align.weight must be a number >= 0 (0 turns the alignment term off), "
                              f"got {self.align.weight}")
        if self.align.noise not in ("independent", "coupled"):
            raise ConfigError(f"align.noise must be 'independent' or 'coupled', got {self.align.noise!r}")
        if self.align.block is not None and self.align.block < 0:
            raise ConfigError(f"align.block must be a block index >= 0 (or null: the first frozen block), "
                              f"got {self.align.block}")
        return self


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}"
                          + _suggest(str(value), choices))


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# dict/YAML -> dataclasses, with type checking and coercion


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, (tuple, list)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):  # a comma-separated --set value
            return [_coerce(_parse_scalar(v.strip()), args[0], key) for v in value.split(",") if v.strip()]
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, bool):
            # YAML reads no/off/false (and yes/on/true) as booleans; a text field such as
            # train.mixed_precision=no means the word.
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ConfigError(f"unknown config key {full!r}" + _suggest(full, valid)
                              + f"; valid keys here: {', '.join(names)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, full)
        else:
            kwargs[key] = _coerce(value, annotation, full)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    return _build(Config, data or {}, "").validate()


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides to a plain config dict; values are parsed as YAML scalars
    (``1e-4``, ``true``, ``[a, b]``, ``null``) and type-checked when the dict is built."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if given) <- ``--set`` overrides, checked."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides or []))


DEFAULT_CONFIG_DIR = Path(__file__).parent / "configs"
