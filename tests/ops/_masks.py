"""Attention masks shared by the CPU and CUDA op tests."""

from __future__ import annotations

import torch


def finfo_min_case(dtype, nk: int, head_dim: int, device="cpu"):
    """q, k, v and an additive mask with rows fully at finfo(float32).min, partly at it, at
    -1e9, fully at -inf and mixing -inf with finfo.min: the masks transformers and diffusers
    build, and the rows whose float32 logsumexp cannot hold the row sum."""
    q = torch.randn(1, 2, 7, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(1, 2, nk, head_dim, dtype=dtype, device=device) for _ in range(2))
    fmin = torch.finfo(torch.float32).min
    mask = torch.randn(1, 2, 7, nk)
    mask[0, 0, 1] = fmin
    mask[0, 1, 2, : nk // 2] = fmin
    mask[0, 0, 3] = float("-inf")
    mask[0, 1, 4] = -1e9
    mask[0, 1, 5, ::2] = float("-inf")
    mask[0, 1, 5, 1::2] = fmin
    return q, k, v, mask.to(device)
