"""Weight-only int8 for the transformer blocks: half the memory of bf16 weights for sampling.

The blocks' Linear weights hold nearly all of a large source's parameters (Z-Image's 6B, FLUX's
12B); stored as int8 with one float32 scale per output row (symmetric, round to nearest) they
take a little over half of their bf16 bytes, and each call dequantizes its own weight to the
input's dtype just before the matmul, so the extra memory at any time is one layer's weight.
The pixel embedding, the Detailer Head, norms, modulation outside the blocks and embeddings
keep their dtype: they are small, and the head is what draws the pixels.

This is for sampling (the quantized model has no gradients for those weights and is not saved);
quantize after loading, and after fusing any LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output row, dequantized per call:
    ``W ~= weight_int8 * weight_scale`` with ``|W - weight_int8 * weight_scale| <= weight_scale / 2``."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 original_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.original_dtype = original_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's original dtype, for code that reads
        ``layer.weight`` (its dtype, device or values) rather than calling the layer."""
        return self.dequantized_weight(self.original_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        # A row of zeros keeps scale 1 (any scale reproduces it) instead of dividing by zero.
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.round(weight / scale).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantized, scale, bias, linear.weight.dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half(), ...: the dtype ``weight`` reports follows, as a Linear's would
        # (fn casts floating tensors only; the int8 buffer and device moves leave it).
        self.original_dtype = fn(torch.empty(0, dtype=self.original_dtype)).dtype
        return super()._apply(fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight_int8.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


@dataclass
class QuantizationReport:
    layers: int          # Linear layers replaced
    bytes_before: int    # the model's parameter and buffer bytes before
    bytes_after: int     # and after


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def quantize_blocks_int8(model) -> QuantizationReport:
    """Replace every Linear inside the pixel transformer's blocks (``model.blocks()``) with an
    ``Int8Linear``, in place. Idempotent: layers already quantized are left as they are."""
    before = _bytes(model)
    layers = 0
    with torch.no_grad():
        for _, block in model.blocks():
            for name, module in list(block.named_modules()):
                if type(module) is not nn.Linear:
                    continue
                parent_name, _, leaf = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                quantized = Int8Linear.from_linear(module).to(module.weight.device)
                setattr(parent, leaf, quantized)
                layers += 1
    return QuantizationReport(layers, before, _bytes(model))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
