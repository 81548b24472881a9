"""Attention inside a converted model through ``l2p.ops.attention``.

diffusers 0.42 has two attention paths, and both end in one global name the processor's
``__call__`` looks up in its own module:

- older path (DiT, PixArt, SD3, Sana, HunyuanDiT, Lumina2): ``AttnProcessor2_0``,
  ``JointAttnProcessor2_0``, ... call ``F.scaled_dot_product_attention`` on (B, H, S, D);
- newer path (FLUX, Z-Image, Qwen-Image, ...): processors call
  ``dispatch_attention_fn(q, k, v, ...)`` on (B, S, H, D).

``set_attention(model, "l2p")`` replaces each processor by a routed copy: an instance of a
subclass of the processor's own class whose ``__call__`` is the same code object run with
those two names bound to l2p's versions. Projections, norms, RoPE, masks and any processor
state (IP-adapter weights, the chosen dispatch backend) are the source's own, so the routed
processor computes exactly what the native one does with one kernel swapped, and
``set_attention(model, "native")`` restores the original classes. Calls the l2p kernels
cannot serve (dropout, causal masks, context parallelism) fall through to the native function.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F

from l2p.ops import _dispatch
from l2p.ops import attention as l2p_attention
from l2p.ops.attention import MAX_HEAD_DIM

MODES = ("auto", "l2p", "native")


def _kernel_backend(q: torch.Tensor, v: torch.Tensor) -> str:
    """The compiled l2p kernel for q's device, or "auto" (torch) where none serves it (the
    kernels take head dims up to MAX_HEAD_DIM, the value's as well as the query's)."""
    compiled = {"cpu": "cpp", "cuda": "cuda"}.get(q.device.type)
    if compiled is None or max(q.shape[-1], v.shape[-1], 1) > MAX_HEAD_DIM:
        return "auto"
    if _dispatch.auto_choice("attention", q.device.type, q.dtype) == compiled:
        return compiled
    try:
        _dispatch.resolve("attention", compiled, q.device, q.dtype)
    except (RuntimeError, ValueError):
        return "auto"
    return compiled


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` served by ``l2p.ops.attention`` (B, H, S, D)."""
    if dropout_p or is_causal:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return l2p_attention(query, key, value, attn_mask=attn_mask, scale=scale,
                         backend=_kernel_backend(query, value))


def _native_dispatch():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn


def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
    """diffusers' ``dispatch_attention_fn`` (B, S, H, D) served by ``l2p.ops.attention``."""
    if dropout_p or is_causal or parallel_config is not None or attention_kwargs:
        return _native_dispatch()(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                  attention_kwargs=attention_kwargs, backend=backend,
                                  parallel_config=parallel_config)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = l2p_attention(q, k, v, attn_mask=attn_mask, scale=scale, backend=_kernel_backend(q, v))
    return out.transpose(1, 2)


class _FunctionalWithL2P(types.ModuleType):
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` served by l2p."""

    def __init__(self):
        super().__init__("l2p_functional")
        self.scaled_dot_product_attention = scaled_dot_product_attention

    def __getattr__(self, name):
        return getattr(F, name)


_FUNCTIONAL = _FunctionalWithL2P()
# The global names a processor's __call__ may use for attention, and their l2p versions.
_ROUTES = {"F": _FUNCTIONAL, "dispatch_attention_fn": dispatch_attention_fn}
_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(cls: type) -> type | None:
    """A subclass of processor class ``cls`` whose ``__call__`` routes attention to l2p;
    None where its ``__call__`` uses neither route (e.g. Sana's linear attention)."""
    if cls in _ROUTED_CLASSES:
        return _ROUTED_CLASSES[cls]
    call = getattr(cls, "__call__", None)
    call = getattr(call, "__func__", call)
    routed = None
    if isinstance(call, types.FunctionType) and any(n in call.__code__.co_names for n in _ROUTES):
        env = dict(call.__globals__)
        env.update({n: f for n, f in _ROUTES.items() if n in env})
        new_call = types.FunctionType(call.__code__, env, call.__name__, call.__defaults__, call.__closure__)
        new_call.__kwdefaults__ = call.__kwdefaults__
        new_call.__doc__, new_call.__qualname__ = call.__doc__, call.__qualname__
        routed = type(f"L2P{cls.__name__}", (cls,), {"__call__": new_call, "_l2p_native_class": cls,
                                                     "__module__": __name__})
    _ROUTED_CLASSES[cls] = routed
    return routed


def _attention_modules(model: torch.nn.Module):
    for module in model.modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            yield module


def resolve_attention(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """"l2p" or "native" for ``mode`` ("auto" = the faster for this device and dtype: l2p's
    compiled kernel where ``l2p.ops`` measured it faster than torch, i.e. the CPU in fp32;
    torch's SDPA (flash / cuDNN) on CUDA)."""
    if mode not in MODES:
        raise ValueError(f"attention must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "l2p" if _dispatch.auto_choice("attention", torch.device(device).type, dtype) != "torch" else "native"


def set_attention(model: torch.nn.Module, mode: str = "auto") -> str:
    """Route every attention processor of ``model`` through ``l2p.ops.attention`` ("l2p")
    or back to diffusers' own ("native"); "auto" picks the faster for the model's device and
    dtype. Returns the mode applied."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    mode = resolve_attention(mode, device, dtype)
    for module in _attention_modules(model):
        proc = module.processor
        native_cls = getattr(type(proc), "_l2p_native_class", None)
        if mode == "native" and native_cls is not None:
            restored = copy.copy(proc)
            restored.__class__ = native_cls
            module.set_processor(restored)
        elif mode == "l2p" and native_cls is None:
            routed_cls = _routed_class(type(proc))
            if routed_cls is not None:
                routed = copy.copy(proc)
                routed.__class__ = routed_cls
                module.set_processor(routed)
    return mode


def attention_mode(model: torch.nn.Module) -> str:
    """"l2p" if any processor of ``model`` is routed through l2p, else "native"."""
    routed = any(hasattr(type(m.processor), "_l2p_native_class") for m in _attention_modules(model))
    return "l2p" if routed else "native"
