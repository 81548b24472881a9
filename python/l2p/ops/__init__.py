"""The l2p operators. Each is a registered PyTorch operator (``torch.ops.l2p.*``) with a
compiled CPU/CUDA kernel, a fake kernel for torch.compile, autograd, and a pure-PyTorch
reference in :mod:`l2p.ops.reference` that defines its meaning."""

from l2p.ops._dispatch import BACKENDS, auto_choice
from l2p.ops._extension import build_info, has_cuda_kernels, is_compiled
from l2p.ops.attention import attention
from l2p.ops.patch_embed import patch_embed
from l2p.ops.unpatchify import unpatchify

__all__ = [
    "BACKENDS",
    "attention",
    "auto_choice",
    "build_info",
    "has_cuda_kernels",
    "is_compiled",
    "patch_embed",
    "unpatchify",
]
