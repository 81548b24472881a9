"""Input validation shared by the op fronts: every mistake a caller can make becomes a
ValueError or TypeError that says what to change, before any kernel runs."""

from __future__ import annotations

import numbers

import torch


def require_input(name: str, t: object, rank: int, layout: str, *, floating: bool = True) -> torch.Tensor:
    """What every tensor argument of an op must be, checked in one call (the fronts run on every
    op call): a torch.Tensor of ``rank`` dims, floating point where ``floating``, not empty."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout} ({rank} dims), got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one element")
    return t


def autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` as ``torch.autocast`` hands them to F.conv2d, F.linear and SDPA (its
    lower-precision ops): inside an autocast region of their device, the float16, bfloat16 and
    float32 ones in the autocast dtype; float64, non-float ones and None as they are. The
    compiled kernels have no autocast rule, so without this they ran in float32 where the torch
    way ran in bfloat16, and refused the mixed dtypes autocast leaves (bfloat16 activations,
    float32 weights) that the torch way takes."""
    device_type = tensors[0].device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return tensors
    if not enabled:
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
        else t
        for t in tensors
    )


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_same(reference_name: str, reference: torch.Tensor, **others) -> None:
    """All tensors in ``others`` (None allowed) share ``reference``'s dtype and device."""
    dtype, device = reference.dtype, reference.device
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {reference_name} has {dtype}; cast them to one dtype"
            )
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {reference_name} is on {device}; "
                f"move them to one device"
            )


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` by torch's rules. A plain comparison:
    ``torch.broadcast_shapes`` takes longer (about 13 µs on a CPU) than a small attention call."""
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(shape), reversed(target)))


def require_positive_int(name: str, value: object) -> int:
    """A positive integer as a plain int: any numbers.Integral (numpy's integers too, which
    config files and arrays hand over), but not a bool, which is an int by accident."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def require_patch_size(patch_size: object) -> int:
    return require_positive_int("patch_size", patch_size)


def require_divisible(height: int, width: int, patch_size: int, what: str = "image") -> None:
    if height % patch_size or width % patch_size:
        fix_h = -(-height // patch_size) * patch_size
        fix_w = -(-width // patch_size) * patch_size
        raise ValueError(
            f"{what} size {height}x{width} is not a multiple of patch_size {patch_size}; "
            f"resize or pad it to {fix_h}x{fix_w} (or {height - height % patch_size}x"
            f"{width - width % patch_size})"
        )
