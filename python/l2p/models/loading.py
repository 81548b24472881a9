"""diffusers' ``from_pretrained(torch_dtype=...)`` finished where accelerate is absent.

Without accelerate (not a dependency of l2p), diffusers 0.42 loads a model by assigning the
file's tensors in place of the model's whenever the first entry of the model's state dict
already has the file's dtype; for SD3 that entry is a float32 position table, so a float32
checkpoint read with ``torch_dtype=torch.bfloat16`` keeps every weight in float32 (more memory,
other numbers than asked for, and no warning). The accelerate path casts each tensor it loads;
:func:`cast_loaded` does the same afterwards.
"""

from __future__ import annotations

import torch
from torch import nn


def cast_loaded(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Every floating parameter of ``model`` in ``dtype``, except those of the modules the
    model keeps in float32 (``_keep_in_fp32_modules``) and quantized models; in place."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return model
    if getattr(model, "hf_quantizer", None) is not None:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != dtype and not keep & set(name.split(".")):
                param.data = param.data.to(dtype)
    return model


def widest_dtype(dtypes) -> torch.dtype:
    """A dtype that holds every one of ``dtypes`` exactly (bf16 and fp16 together: fp32)."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return kinds.pop()
    return torch.float64 if torch.float64 in kinds else torch.float32


def one_dtype(model: nn.Module) -> nn.Module:
    """A model loaded without ``torch_dtype`` from a folder that stores mixed float dtypes
    (float32 trained tensors over a bfloat16 base after ``l2p merge``; the published L2P
    checkpoints) in the narrowest dtype that holds all of them exactly, so that its layers
    can run: float32, unless every tensor is one 16-bit type."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        cast_loaded(model, widest_dtype(dtypes))
    return model
