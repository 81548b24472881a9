"""Block offload: the weights stay in host memory and each transformer block comes to the
device only for its own forward.

Model offload (``L2PPipeline.enable_model_cpu_offload``) needs the whole transformer on the
device during the loop. Block offload needs its non-block layers (embeddings, final layer,
Detailer Head: a small part) plus one block at a time, at the price of copying every block to
the device once per model call. It is diffusers' ``enable_group_offload(offload_type=
"block_level", num_blocks_per_group=1)``, which needs accelerate; this needs nothing beyond
torch. The copies are synchronous (no prefetch of the next block on a side stream).

The host tensors are kept and the device copies dropped after use, so nothing is ever copied
back: sampling does not change weights. The tensors' identity is kept too (their ``.data``
changes), so module hooks, ``state_dict`` and the like see the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor.data.to("cpu")
    # Pinned host memory lets the copy to a CUDA device run at full speed and asynchronously.
    return host.pin_memory() if pin else host


class HostWeights:
    """The parameters and buffers ``tensors``, held in host memory; ``onload`` gives each a
    copy on ``device``, ``offload`` points each back at its host tensor."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self.device = device
        self.tensors = tensors
        pin = device.type == "cuda"
        self.host = [_host_copy(t, pin) for t in tensors]
        for tensor, host in zip(tensors, self.host):
            tensor.data = host
        self.onloaded = False

    def onload(self) -> None:
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host.to(self.device, non_blocking=True)
        self.onloaded = True

    def offload(self) -> None:
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host
        self.onloaded = False


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class BlockOffload:
    """Block offload of one model: ``blocks`` (its transformer blocks) each on ``device`` only
    during their own forward, the rest of the model on ``device`` between ``onload_rest`` and
    ``offload``."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device: torch.device):
        self.model = model
        in_blocks = {id(t) for block in blocks for t in _tensors(block)}
        self.rest = HostWeights([t for t in _tensors(model) if id(t) not in in_blocks], device)
        self.blocks = [HostWeights(_tensors(block), device) for block in blocks]
        self._hooks = []
        for block, weights in zip(blocks, self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda *_, w=weights: w.onload()))
            self._hooks.append(block.register_forward_hook(lambda *_, w=weights: w.offload()))

    def onload_rest(self) -> None:
        self.rest.onload()

    def offload(self) -> None:
        """Everything back to host memory (a block whose forward raised included)."""
        self.rest.offload()
        for weights in self.blocks:
            weights.offload()

    def remove(self) -> None:
        """Remove the hooks; the weights stay in host memory."""
        self.offload()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def largest_block_list(model: nn.Module) -> list[nn.Module]:
    """The blocks of a model whose block list is not known by name (a text encoder): the
    ``nn.ModuleList`` holding the most parameters, or [] if it has none."""
    best, best_size = [], 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best
