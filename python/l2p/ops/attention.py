"""``l2p.ops.attention``: memory-efficient (flash-style) scaled dot-product attention."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from l2p.ops import _checks, _dispatch, _extension

MAX_HEAD_DIM = 256


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal attention softmax(q k^T * scale + mask) v, in the layout of
    ``F.scaled_dot_product_attention``.

    Args:
        q: (B, Hq, Nq, Dh).
        k: (B, Hk, Nk, Dh); Hq must be a multiple of Hk (grouped-query attention: query head
            h reads key/value head h // (Hq // Hk)).
        v: (B, Hk, Nk, Dv).
        attn_mask: optional, broadcastable to (B, Hq, Nq, Nk): boolean (True = attend) or
            additive float. The key-padding shape (B, 1, 1, Nk) is the common case. A query
            row with no key to attend to (False or -inf everywhere) gets zeros, as in PyTorch;
            one at a finite value everywhere (finfo.min) averages V, as in PyTorch. A mask that
            requires grad is differentiated on the torch path only ("auto" takes it).
        scale: defaults to 1/sqrt(Dh).
        backend: "auto" (fastest measured path), "cpp", "cuda" or "torch"
            (``F.scaled_dot_product_attention``).

    The compiled kernels tile the keys with an online softmax, so memory is O(N), and the
    backward pass recomputes the probabilities instead of storing them. Computation is in
    float32 for float16 / bfloat16 inputs.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.require_input(name, t, 4, "(B, H, N, D)")
    q, k, v = _checks.autocast(q, k, v)
    _checks.require_same("q", q, k=k, v=v)
    batch, hq, nq, dh = q.shape
    k_batch, hk, nk, k_dh = k.shape
    v_batch, hv, nv, dv = v.shape
    if k_batch != batch or v_batch != batch:
        raise ValueError(f"q, k, v batch sizes differ: {batch}, {k_batch}, {v_batch}")
    if hk != hv:
        raise ValueError(f"k has {hk} heads but v has {hv}; they must match")
    if hq % hk:
        raise ValueError(
            f"q has {hq} heads, not a multiple of the {hk} key/value heads; grouped-query "
            "attention needs Hq % Hk == 0"
        )
    if nk != nv:
        raise ValueError(f"k has {nk} keys but v has {nv} values")
    if k_dh != dh:
        raise ValueError(f"q head dim {dh} differs from k head dim {k_dh}")
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    elif (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
          or not math.isfinite(scale)):
        # numbers.Real: numpy's floats too (np.float32 is no float), which SDPA takes.
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    mask_needs_grad = False
    if attn_mask is not None:
        _check_mask(attn_mask, q, k)
        if attn_mask.dim() < 4:
            # Leading 1s, as broadcasting would add them: SDPA indexes the mask's dims and
            # fails on a 0-D or 1-D one, so both paths get the same 4-D mask.
            attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        mask_needs_grad = attn_mask.requires_grad and torch.is_grad_enabled()
    chosen = _dispatch.resolve("attention", backend, q.device, q.dtype)
    if chosen != "torch" and mask_needs_grad:
        # The compiled kernels give no gradient for the mask (their autograd returns none for
        # it), which would leave a learned bias silently untrained; the torch path gives one.
        if backend != "auto":
            raise ValueError(
                f"attn_mask requires grad, which backend={backend!r} cannot give (its kernels "
                "differentiate q, k and v only); use backend='torch' or 'auto', or detach the mask"
            )
        chosen = "torch"
    if chosen != "torch" and max(dh, dv) > MAX_HEAD_DIM:
        if backend != "auto":
            raise ValueError(
                f"head dim {max(dh, dv)} exceeds {MAX_HEAD_DIM}, the most the compiled "
                "kernels support; use backend='torch'"
            )
        chosen = "torch"
    if chosen == "torch":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_torch_mask(attn_mask, q), scale=float(scale),
            enable_gqa=hq != hk,
        )
    mask = None if attn_mask is None else _additive_mask(attn_mask, q, k)
    out, _ = torch.ops.l2p.attention_forward(q, k, v, mask, float(scale))
    return out


def _mask_target(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _check_mask(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """The same errors for a bad mask whichever backend runs."""
    _checks.require_tensor("attn_mask", attn_mask)
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    target = _mask_target(q, k)
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask has {attn_mask.dim()} dims; at most 4 (B, H, Nq, Nk)")
    if not _checks.broadcasts_to(attn_mask.shape, target):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, Hq, Nq, Nk) "
            f"= {target}; a key-padding mask is (B, 1, 1, Nk)"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")


def _additive_mask(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An additive view of a checked mask at (B, Hq, Nq, Nk), broadcast without copying:
    what the compiled kernels take (torch's SDPA takes the mask as given). float32, except
    float64 for float64 inputs on the CPU, whose kernel computes in float64."""
    dtype = torch.float64 if q.dtype == torch.float64 and q.device.type == "cpu" else torch.float32
    if attn_mask.dtype == torch.bool:
        # One kernel; a zeros tensor filled through the inverted mask takes three.
        additive = torch.where(attn_mask, 0.0, float("-inf"))
        if additive.dtype != dtype:
            additive = additive.to(dtype)
    else:
        additive = _mask_as(attn_mask, dtype)
    return additive.expand(_mask_target(q, k))


def _torch_mask(attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    return _mask_as(attn_mask, q.dtype)


def _mask_as(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float mask in ``dtype`` with its finite values kept finite. A plain cast turns a value
    beyond dtype's range (finfo(float32).min in bfloat16 or float16, finfo(float64).min in
    float32) into -inf, and a row masked with it everywhere from one that averages V into one
    that attends to nothing; saturated at finfo(dtype).min it still averages V."""
    if attn_mask.dtype == dtype:
        return attn_mask
    info = torch.finfo(dtype)
    if info.max >= torch.finfo(attn_mask.dtype).max:
        return attn_mask.to(dtype)
    return torch.where(attn_mask.isinf(), attn_mask, attn_mask.clamp(info.min, info.max)).to(dtype)


def _register_fake_kernels() -> None:
    """Shape-only kernels for torch.compile and FakeTensor; the autograd is C++
    (csrc/attention/attention_autograd.cpp)."""
    # The checks mirror check_qkv and check_mask in csrc/attention/cpu/attention_cpu.cpp, so
    # that FakeTensor and torch.compile refuse what the real kernels refuse instead of tracing
    # a shape for it.
    @torch.library.register_fake("l2p::attention_forward")
    def _(q, k, v, attn_mask, scale):
        _check_fake_args(q, k, v, attn_mask)
        out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
        lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("l2p::attention_backward")
    def _(grad_out, q, k, v, out, lse, attn_mask, scale):
        _check_fake_args(q, k, v, attn_mask)
        out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        for name, t in (("grad_out", grad_out), ("out", out)):
            torch._check_value(tuple(t.shape) == out_shape,
                               lambda: f"l2p: attention_backward {name} must be {out_shape}, "
                                       f"got {tuple(t.shape)}")
            torch._check_type(t.dtype == q.dtype,
                              lambda: f"l2p: attention_backward {name} dtype {t.dtype} differs "
                                      f"from q dtype {q.dtype}")
        torch._check_value(tuple(lse.shape) == out_shape[:3],
                           lambda: f"l2p: attention_backward lse must be (B, Hq, Nq), "
                                   f"got {tuple(lse.shape)}")
        torch._check_type(lse.dtype == torch.float32,
                          lambda: f"l2p: attention_backward lse must be float32, got {lse.dtype}")
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _check_fake_args(q, k, v, attn_mask) -> None:
    """The fake-kernel form of check_qkv and check_mask in csrc/attention/cpu/attention_cpu.cpp."""
    shapes = lambda: f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"  # noqa: E731
    torch._check_value(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                       lambda: f"l2p: attention q, k, v must be (B, H, N, D), got shapes {shapes()}")
    torch._check_type(q.is_floating_point(),
                      lambda: f"l2p: attention q must be floating point, got {q.dtype}")
    torch._check_type(k.dtype == q.dtype and v.dtype == q.dtype,
                      lambda: f"l2p: attention q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check_value(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0],
                       lambda: f"l2p: attention batch sizes differ: {shapes()}")
    torch._check_value(v.shape[1] == k.shape[1] and v.shape[2] == k.shape[2],
                       lambda: f"l2p: attention k and v must have the same heads and length: {shapes()}")
    torch._check_value(k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
                       lambda: f"l2p: attention q has {q.shape[1]} heads, not a multiple of the "
                               f"{k.shape[1]} kv heads")
    torch._check_value(k.shape[3] == q.shape[3],
                       lambda: f"l2p: attention q head dim {q.shape[3]} differs from k head dim "
                               f"{k.shape[3]}")
    torch._check_value(q.shape[3] > 0 and v.shape[3] > 0,
                       lambda: f"l2p: attention head dims must be positive: {shapes()}")
    if attn_mask is not None:
        # float64 for float64 inputs on the CPU, as _additive_mask builds it.
        in_double = q.dtype == torch.float64 and q.device.type == "cpu"
        mask_dtype = torch.float64 if in_double else torch.float32
        torch._check_type(attn_mask.dtype == mask_dtype,
                          lambda: f"l2p: attention attn_mask must be an additive {mask_dtype} "
                                  f"tensor for {q.dtype} inputs, got {attn_mask.dtype}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        torch._check_value(tuple(attn_mask.shape) == target,
                           lambda: f"l2p: attention attn_mask must be expanded to (B, Hq, Nq, Nk) "
                                   f"= {target}, got {tuple(attn_mask.shape)}")


if _extension.is_compiled():
    _register_fake_kernels()
