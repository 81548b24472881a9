"""The source model's own training objective, applied to pixels.

Flow-matching sources (SD3, FLUX, Sana, Z-Image, ...): x_s = (1 - s) x0 + s eps, target the
velocity eps - x0 (times the source's sign: Z-Image and Lumina2 models output the negated
velocity), with the source's time shift s' = k s / (1 + (k - 1) s); FLUX-style dynamic shift
uses k = exp(mu(image_seq_len)) from the scheduler config, exactly as its sampler does.
DDPM-style sources (PixArt, DiT): x_t and the target (epsilon or v) come from the diffusers
DDPMScheduler built from the source scheduler's config, so betas and conventions match.

Every random draw takes an explicit ``torch.Generator``: the trainer seeds one per sample from
(seed, step, sample slot), which is what makes resumed and multi-process runs exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from l2p.train.config import ConfigError, ObjectiveConfig

FLOW_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
)


@dataclass
class Objective:
    kind: str  # "flow", "epsilon" or "v_prediction"
    sign: float = 1.0
    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    # FLUX-style dynamic shift: (base_seq_len, max_seq_len, base_shift, max_shift), or None.
    dynamic_shift: tuple[int, int, float, float] | None = None
    num_train_timesteps: int = 1000
    ddpm_scheduler: object | None = None

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, cfg: ObjectiveConfig, *, sign: float = 1.0) -> "Objective":
        """``scheduler_config``: the source pipeline's scheduler config (scheduler_config.json,
        with ``_class_name``). ``cfg.prediction == "auto"`` picks the source's objective."""
        class_name = scheduler_config.get("_class_name", "")
        kind = cfg.prediction
        if kind == "auto":
            # FlowMatch* schedulers, or DPM-Solver/UniPC in flow mode (Sana, the toy source).
            if class_name in FLOW_SCHEDULERS or "FlowMatch" in class_name \
                    or scheduler_config.get("prediction_type") == "flow_prediction":
                kind = "flow"
            else:
                kind = scheduler_config.get("prediction_type", "epsilon")
        if kind not in ("flow", "epsilon", "v_prediction"):
            raise ConfigError(f"source scheduler {class_name} uses prediction_type {kind!r}; "
                              "set objective.prediction to flow, epsilon or v_prediction")
        common = dict(kind=kind, sign=sign, density=cfg.timestep_density, logit_mean=cfg.logit_mean,
                      logit_std=cfg.logit_std,
                      num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)))
        if kind == "flow":
            dynamic = None
            if cfg.shift is not None:
                shift = float(cfg.shift)
            elif scheduler_config.get("use_dynamic_shifting", False):
                shift = 1.0
                dynamic = (int(scheduler_config.get("base_image_seq_len", 256)),
                           int(scheduler_config.get("max_image_seq_len", 4096)),
                           float(scheduler_config.get("base_shift", 0.5)),
                           float(scheduler_config.get("max_shift", 1.15)))
            else:
                shift = float(scheduler_config.get("shift", scheduler_config.get("flow_shift", 1.0)) or 1.0)
            if shift <= 0:
                raise ConfigError(f"objective.shift must be > 0, got {shift}")
            return cls(shift=shift, dynamic_shift=dynamic, **common)
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "timestep_spacing", "rescale_betas_zero_snr", "steps_offset")
        ddpm_config = {k: scheduler_config[k] for k in keys if k in scheduler_config}
        ddpm = DDPMScheduler(**ddpm_config, prediction_type=kind)
        return cls(ddpm_scheduler=ddpm, **common)

    # -- time -------------------------------------------------------------------------------

    def shift_for(self, image_seq_len: int) -> float:
        """The k of s' = k s / (1 + (k-1) s) at this token count."""
        if self.dynamic_shift is None:
            return self.shift
        base_len, max_len, base_shift, max_shift = self.dynamic_shift
        slope = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * slope + (base_shift - slope * base_len)
        return math.exp(mu)

    def sample_time(self, generator: torch.Generator, image_seq_len: int) -> float | int:
        """One sample's time: s in (0, 1) for flow sources, an integer step for DDPM ones."""
        if self.density == "uniform":
            u = torch.rand((), generator=generator, dtype=torch.float64).item()
        else:
            z = torch.randn((), generator=generator, dtype=torch.float64).item()
            u = 1.0 / (1.0 + math.exp(-(self.logit_mean + self.logit_std * z)))
        if self.kind != "flow":
            return min(int(u * self.num_train_timesteps), self.num_train_timesteps - 1)
        k = self.shift_for(image_seq_len)
        return k * u / (1.0 + (k - 1.0) * u)

    # -- noising and target -----------------------------------------------------------------

    def scheduler_timesteps(self, times: torch.Tensor) -> torch.Tensor:
        """Times in the unit the source pipeline hands its transformer before any
        family-specific rescaling: sigma x num_train_timesteps for flow, the integer step
        for DDPM."""
        if self.kind == "flow":
            return times.to(torch.float32) * self.num_train_timesteps
        return times

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor):
        """``times``: (B,) flow times s (float) or DDPM steps (long). Returns (x_t, target)."""
        if self.kind == "flow":
            s = times.to(device=x0.device, dtype=x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
            x_t = (1.0 - s) * x0 + s * noise
            target = noise - x0
        else:
            sched = self.ddpm_scheduler
            x_t = sched.add_noise(x0, noise, times.to(x0.device))
            target = noise if self.kind == "epsilon" else sched.get_velocity(x0, noise, times.to(x0.device))
        if self.sign != 1.0:
            target = self.sign * target
        return x_t, target
