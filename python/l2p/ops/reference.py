"""Pure-PyTorch definitions of the l2p ops. They define what each op means: compiled kernels
are tested against them, and they run wherever no kernel is faster or available."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_embed_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch_size: int
) -> torch.Tensor:
    """(B,C,H,W) -> (B,(H/p)*(W/p),D): a stride-p convolution read out token by token."""
    return F.conv2d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)


def unpatchify_reference(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """(B,N,D) -> Linear(D, C*p*p) -> (B,C,H,W); feature c*p*p + i*p + j is pixel (c,i,j)
    of its patch, the layout of a Conv2d patch-embedding weight."""
    p = patch_size
    rows, cols = height // p, width // p
    channels = weight.shape[0] // (p * p)
    features = F.linear(tokens, weight, bias)
    image = features.view(tokens.shape[0], rows, cols, channels, p, p)
    return image.permute(0, 3, 1, 4, 2, 5).reshape(tokens.shape[0], channels, height, width)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v with grouped-query heads, in the math of
    F.scaled_dot_product_attention: a row whose keys are all masked gives zeros.

    Returns the output and the row logsumexp (float32, -inf for such a row). Memory is
    O(Nq*Nk): this is the definition, not a path for long sequences.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute)
    # exp(scores - lse) would be wrong where the scores are huge: at -1e9 (float32 ulp 64) or
    # finfo.min, lse = max + log(sum) rounds back to max, every probability comes out 1 and the
    # row sums V instead of averaging it. Dividing by the sum keeps the normalisation exact.
    # The row max is detached (softmax does not depend on it), so a row whose keys are all
    # -inf differentiates through exp(-inf) = 0 instead of through inf - inf.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    dead = torch.isneginf(row_max)  # attends to nothing: zeros and -inf, as in PyTorch
    e = torch.exp(scores - row_max.masked_fill(dead, 0.0))
    total = e.sum(dim=-1, keepdim=True)
    probs = e / total.masked_fill(dead, 1.0)
    out = torch.matmul(probs, v.to(compute)).to(q.dtype)
    lse = (row_max + torch.log(total)).squeeze(-1)
    return out, lse.to(torch.float32)
