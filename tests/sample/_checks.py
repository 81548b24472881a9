"""Checks shared by the per-family end-to-end sampling tests."""

from __future__ import annotations

import torch

from l2p.sample import attention as attn_mod


def assert_attention_modes_agree(pipe, run, monkeypatch) -> None:
    """``run(pipe)`` gives the same image with attention="native" and "l2p" (within 1e-5),
    and only the "l2p" mode reaches l2p's attention."""
    calls = []
    original = attn_mod.l2p_attention
    monkeypatch.setattr(attn_mod, "l2p_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    images = {}
    try:
        for mode in ("native", "l2p"):
            pipe.set_attention(mode)
            images[mode] = run(pipe)
            assert bool(calls) == (mode == "l2p")
    finally:
        pipe.set_attention("auto")
    torch.testing.assert_close(images["l2p"], images["native"], rtol=1e-5, atol=1e-5)
