"""Timesteps as each source pipeline sets them, the time shift, and the UHR recommendations.

The pixel model keeps the source's token grid, so the source pipeline's schedule carries over
unchanged: the same sigmas, and for dynamically shifted flow schedulers (FLUX, SD3.5 with
``use_dynamic_shifting``, Z-Image, Qwen-Image, Lumina2) the same ``mu`` computed from the token
count (H/P) x (W/P). What differs between families is written once, on each family's adapter.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from l2p.ops._checks import require_positive_int


@dataclass(frozen=True)
class Recipe:
    """How one family's pipeline prepares its timesteps and reads ``guidance_scale``; the
    values live on its adapter (see SourceAdapter.flow_sigmas and the fields beside it)."""

    flow_sigmas: bool = False
    max_shift: float = 1.15
    distilled_guidance: bool = False
    guidance_scale_offset: float = 0.0


def recipe_for(source_class: str) -> Recipe:
    from l2p.adapters import ADAPTERS

    if source_class not in ADAPTERS:
        raise ValueError(f"no sampling recipe for {source_class}; families: {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[source_class]
    return Recipe(adapter.flow_sigmas, adapter.max_shift, adapter.distilled_guidance,
                  adapter.guidance_scale_offset)


def dynamic_mu(image_seq_len: int, config, max_shift_default: float = 1.15) -> float:
    """``mu`` as the diffusers pipelines compute it (their ``calculate_shift``, linear in the
    token count), with the scheduler config's bounds and the family's defaults."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                           config.get("max_shift", max_shift_default))


def _check_shift(shift, name: str = "shift") -> float:
    # numbers.Real: numpy's floats too (np.float32 is no float).
    if isinstance(shift, bool) or not (isinstance(shift, numbers.Real) and shift > 0 and math.isfinite(shift)):
        raise ValueError(f"{name} must be a positive number, got {shift!r}")
    return float(shift)


def _check_size(height, width) -> tuple[int, int]:
    """The image size in pixels as positive ints (a zero or negative side is a mistake the
    recommendations would otherwise answer with the 1K values)."""
    return require_positive_int("height", height), require_positive_int("width", width)


def _shift_key(config, class_name: str) -> str:
    """The config field that holds a flow scheduler's static time shift."""
    for key in ("shift", "flow_shift"):
        if key in config:
            return key
    raise ValueError(
        f"{class_name} has no flow time shift; a shift needs a flow-matching scheduler "
        f"(FlowMatchEulerDiscreteScheduler, or DPM-Solver/UniPC with flow_shift)"
    )


def with_shift(scheduler, shift: float):
    """A copy of ``scheduler`` whose flow time shift is ``shift`` (s' = k s / (1 + (k-1) s)).
    Returns (scheduler, mu) where mu is set for dynamically shifted schedulers (k = exp(mu))."""
    shift = _check_shift(shift)
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        return scheduler, math.log(shift)
    key = _shift_key(config, type(scheduler).__name__)
    return type(scheduler).from_config({**config, key: shift}), None


def scheduler_config_with_shift(config: dict, shift: float) -> dict:
    """A flow scheduler's config (scheduler_config.json, with ``_class_name``) set to sample
    at the fixed time shift ``shift``: what a model trained at that shift
    (``objective.shift``) must sample with. Dynamic shifting is turned off, since a shift
    fixed in training does not follow the token count."""
    shift = _check_shift(shift)
    key = _shift_key(config, config.get("_class_name", "this scheduler"))
    shifted = {**config, key: shift}
    if "use_dynamic_shifting" in config:
        shifted["use_dynamic_shifting"] = False
    return shifted


def set_timesteps(scheduler, recipe: Recipe, num_steps: int, tokens: int, device,
                  mu: float | None = None) -> torch.Tensor:
    """Set the scheduler's timesteps exactly as the source pipeline would for ``tokens``
    image tokens, and return them."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_steps!r}")
    config = scheduler.config
    if config.get("shift_terminal") and num_steps < 2:
        # Stretching one sigma to end at shift_terminal divides 0 by 0: the timesteps are NaN
        # and the first scheduler step fails looking its NaN timestep up (as in the source pipeline).
        raise ValueError(f"{type(scheduler).__name__} with shift_terminal={config['shift_terminal']} "
                         f"needs num_inference_steps >= 2, got {num_steps}")
    kwargs = {}
    # Some pipelines (FLUX, Z-Image) compute mu whatever the scheduler; it only takes effect
    # (and DPM-Solver only accepts it) with dynamic shifting, so pass it then.
    if config.get("use_dynamic_shifting", False):
        kwargs["mu"] = dynamic_mu(tokens, config, recipe.max_shift) if mu is None else mu
    if recipe.flow_sigmas and not config.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    if "sigmas" in kwargs and "sigmas" not in accepted:
        raise ValueError(f"{type(scheduler).__name__} does not take custom sigmas, which "
                         f"this family's pipeline sets")
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if "sigmas" in kwargs:
        scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), device=device, **kwargs)
    else:
        scheduler.set_timesteps(num_steps, device=device, **kwargs)
    return scheduler.timesteps


# -- ultra-high resolution ---------------------------------------------------------------

# Anchors from the paper: Z-Image's own shift at 1K (k = 3) and the best shift it measured at
# 4K (about 4-5, we take 4.5), i.e. 1.5x the 1K shift per 16x the pixels. That ratio is what
# other sources inherit, from their own 1K shift. (Before, every source got these absolute
# values, and 3 replaced the source's own schedule even at and below 1K, FLUX's token-count
# mu included; for a source whose 1K shift is 3 nothing changed.)
_SHIFT_1K, _SHIFT_4K = 3.0, 4.5
_ONE_K = 1024


def recommended_shift(height: int, width: int, patch: int | None = None, *,
                      base_shift: float = _SHIFT_1K) -> float:
    """The flow time shift k to sample at (height, width) in pixel space, for a source whose
    own shift at 1024 x 1024 is ``base_shift`` (see ``source_shift_at_1k``).

    L2P keeps the token count fixed as the resolution grows (``recommended_patch_size``),
    so the token-count rule of FLUX-style dynamic shifting sees a 1K image at 4K and would
    leave the shift where it was; but each token now covers more, highly correlated, pixels
    and needs more noise. The paper's best shift at 4K is about 4-5, against Z-Image's own 3
    at 1K. We interpolate log-linearly in the pixel count from the source's 1K shift with
    that ratio (k = base_shift * 1.5 ** log16(pixels / 1024^2)), extrapolating beyond: for
    base_shift 3 (Z-Image, SD3), 1K -> 3, 2K -> 3.67, 4K -> 4.5, 8K -> 5.5. ``patch`` is
    accepted for symmetry with ``recommended_patch_size`` and checked (H and W must be
    multiples of it); the shift does not depend on it. At and below 1K, base_shift is
    returned; ``L2PPipeline(shift="recommended")`` then keeps the source's scheduler as it is.
    """
    height, width = _check_size(height, width)
    base_shift = _check_shift(base_shift, "base_shift")
    if patch is not None:
        patch = require_positive_int("patch", patch)
    if patch is not None and (height % patch or width % patch):
        raise ValueError(f"{height}x{width} is not a multiple of the patch size {patch}")
    ratio = height * width / _ONE_K**2
    if ratio <= 1:
        return float(base_shift)
    return float(base_shift * (_SHIFT_4K / _SHIFT_1K) ** (math.log(ratio) / math.log(16)))


def source_shift_at_1k(scheduler, recipe: Recipe, source_patch: int) -> float:
    """The time shift the source's own scheduler samples a 1024 x 1024 image at: its static
    shift, or for dynamic shifting exp(mu) at the source's 1K token count (1024 /
    ``source_patch``)^2, mu as its pipeline computes it (FLUX.1: exp(1.15) = 3.16)."""
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        tokens = (_ONE_K // source_patch) ** 2
        return math.exp(dynamic_mu(tokens, config, recipe.max_shift))
    return float(config[_shift_key(config, type(scheduler).__name__)])


def recommended_sampling_shift(scheduler, recipe: Recipe, height: int, width: int, patch: int,
                               source_patch: int) -> float | None:
    """What ``shift="recommended"`` samples (height, width) at: None (the source's scheduler
    exactly as it is, a dynamic one with its own token-count mu) up to 1024 x 1024 pixels;
    above, ``recommended_shift`` from the source's own 1K shift. ``patch``: the pixel model's
    patch; ``source_patch``: the source's (latent patch x VAE factor)."""
    if height * width <= _ONE_K**2:
        if height % patch or width % patch:
            raise ValueError(f"{height}x{width} is not a multiple of the patch size {patch}")
        return None
    return recommended_shift(height, width, patch,
                             base_shift=source_shift_at_1k(scheduler, recipe, source_patch))


def recommended_patch_size(height: int, width: int, *, base_patch: int = 16,
                           max_tokens: int = 4096) -> int:
    """The pixel patch that keeps the token grid at most ``max_tokens`` (the source's 1K
    grid): base_patch times the smallest power of two that does, e.g. 16 at 1K, 32 at 2K,
    64 at 4K (4096 tokens, the official 4K model), 128 at 8K. Convert with
    ``l2p convert --patch-size`` (and train) for that size."""
    height, width = _check_size(height, width)
    patch = require_positive_int("base_patch", base_patch)
    max_tokens = require_positive_int("max_tokens", max_tokens)
    while (height // patch) * (width // patch) > max_tokens:
        patch *= 2
    return patch
