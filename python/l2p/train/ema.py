"""Exponential moving average of the trainable parameters, kept in fp32.

The average lives beside the model (not a model copy) so it costs one fp32 tensor per trainable
parameter and nothing for the frozen backbone; it is checkpointed as safetensors and can be
swapped into the model for sampling or export.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: dict[str, nn.Parameter], decay: float, start_step: int = 0):
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.params = dict(named_params)
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """``step``: optimizer steps taken so far. Before ``start_step`` the average is a copy."""
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [_local(self.params[n]).float() for n in names]
        if step <= self.start_step:
            torch._foreach_copy_(shadow, current)
        else:
            torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the averaged weights into the model (for sampling/export)."""
        backup = {n: _local(p).detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                _local(p).copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    _local(p).copy_(backup[n])


def _local(param: torch.Tensor) -> torch.Tensor:
    """The locally held tensor of a (possibly FSDP2-sharded DTensor) parameter."""
    return param.to_local() if hasattr(param, "to_local") else param
