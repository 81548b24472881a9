"""Reading safetensors files with an unreadable one reported as a one-line ValueError."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open


def open_safetensors(path: str | os.PathLike):
    """``safe_open`` with an unreadable file (truncated, not safetensors) as a ValueError
    naming it, instead of safetensors' bare SafetensorError."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError (not exported by name), or an OS error
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def read_tensors(path: str | os.PathLike, names=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (all, or ``names``), unreadable data as a ValueError."""
    with open_safetensors(path) as f:
        try:
            return {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}
        except Exception as exc:  # a header that promises more bytes than the file holds
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
