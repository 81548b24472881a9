"""Attention routed through l2p.ops.attention equals diffusers' own, for every family."""

from __future__ import annotations

import pytest
import torch

from l2p.sample import attention as attn_mod
from l2p.sample.attention import attention_mode, resolve_attention, set_attention

import _families as fam  # tests/conversion/_families.py (path set in conftest)


@pytest.fixture
def count_l2p_calls(monkeypatch):
    calls = []
    original = attn_mod.l2p_attention

    def counting(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(attn_mod, "l2p_attention", counting)
    return calls


@pytest.mark.parametrize("name", fam.FAMILIES)
def test_l2p_equals_native(name, count_l2p_calls):
    import diffusers

    from l2p import convert_to_pixel

    torch.manual_seed(0)
    source = getattr(diffusers, name)(**fam.TINY[name]).eval()
    levels = fam.PATCH[name].bit_length() - 1
    model = convert_to_pixel(source, head={"type": "detailer", "channels": [8] * levels})
    h, w = fam.image_size(name)
    gen = torch.Generator().manual_seed(0)
    kwargs = fam.call_kwargs(name, 2, h, w, gen)
    x = torch.randn(2, 3, h, w, generator=gen)
    with torch.no_grad():
        assert set_attention(model, "native") == "native"
        native = model(x, **kwargs).sample
        assert set_attention(model, "l2p") == "l2p" and attention_mode(model) == "l2p"
        routed = model(x, **kwargs).sample
        set_attention(model, "native")
        again = model(x, **kwargs).sample
    assert count_l2p_calls, f"{name}: no attention call reached l2p.ops.attention"
    assert attention_mode(model) == "native"
    torch.testing.assert_close(routed, native, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, native, rtol=0, atol=0)


def test_auto_mode_and_bad_name():
    assert resolve_attention("auto", torch.device("cuda"), torch.bfloat16) == "native"
    from l2p.ops import _dispatch

    cpu = "l2p" if _dispatch.auto_choice("attention", "cpu", torch.float32) != "torch" else "native"
    assert resolve_attention("auto", torch.device("cpu"), torch.float32) == cpu
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_attention("flash", torch.device("cpu"), torch.float32)


def test_a_value_head_dim_beyond_the_kernels_goes_to_torch():
    """Routed SDPA with q/k head dim 64 and value head dim 300 (above MAX_HEAD_DIM): the torch
    path serves it, as native SDPA would, instead of the kernel refusing it."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 64, generator=gen), torch.randn(1, 2, 7, 64, generator=gen)
    v = torch.randn(1, 2, 7, attn_mod.MAX_HEAD_DIM + 44, generator=gen)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attn_mod.scaled_dot_product_attention(q, k, v), expected)
    out = attn_mod.dispatch_attention_fn(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out.transpose(1, 2), expected)
