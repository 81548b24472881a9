"""The parts of the op fronts that stand in for slower torch calls: the mask broadcast check
and the backend choices decided at import."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from l2p.ops import _checks, _dispatch


def test_broadcast_check_agrees_with_torch():
    rng = random.Random(0)
    target_sizes = (1, 2, 3)
    for _ in range(2000):
        target = tuple(rng.choice(target_sizes) for _ in range(4))
        shape = tuple(rng.choice((0, 1, 2, 3, 4)) for _ in range(rng.randint(0, 5)))
        try:
            expected = torch.broadcast_shapes(shape, target) == target
        except RuntimeError:
            expected = False
        assert _checks.broadcasts_to(shape, target) == expected, (shape, target)
        assert _checks.broadcasts_to(torch.Size(shape), target) == expected, (shape, target)


def test_choices_decided_at_import_are_the_checked_ones():
    keys = itertools.product(_dispatch.OPS, _dispatch.BACKENDS, ("cpu", "cuda"),
                             (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    for op, backend, device_type, dtype in keys:
        device = torch.device(device_type)
        try:
            checked = _dispatch._resolve(op, backend, device, dtype)
        except (RuntimeError, ValueError):
            assert (op, backend, device_type, dtype) not in _dispatch._RESOLVED
            with pytest.raises((RuntimeError, ValueError)):
                _dispatch.resolve(op, backend, device, dtype)
            continue
        assert _dispatch._RESOLVED[(op, backend, device_type, dtype)] == checked
        assert _dispatch.resolve(op, backend, device, dtype) == checked
    # "auto" on the CPU is decided in advance for every op, whatever was built.
    assert all((op, "auto", "cpu", torch.float32) in _dispatch._RESOLVED for op in _dispatch.OPS)


def test_choices_outside_the_table_still_get_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("attention", ["cpp"], torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("attention", "fast", torch.device("cpu"), torch.float32)
    assert _dispatch.resolve("attention", "auto", torch.device("meta"), torch.float32) == "torch"
    assert _dispatch.resolve("attention", "auto", torch.device("cpu"), torch.int64) == "torch"


def _autocast_cases():
    """Per op: a call taking a backend, on bfloat16 activations with float32 weights, as a
    model runs under autocast (and float32 attention keys beside bfloat16 queries and values,
    which diffusers' RMSNorm leaves after a bfloat16 projection)."""
    import l2p.ops

    x = torch.randn(2, 3, 8, 12).bfloat16()
    w_embed, b_embed = torch.randn(5, 3, 4, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    tokens = torch.randn(2, 6, 7).bfloat16()
    w_head, b_head = torch.randn(3 * 16, 7, requires_grad=True), torch.randn(48, requires_grad=True)
    q, v = torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 6, 8).bfloat16()
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    return {
        "patch_embed": (lambda b: l2p.ops.patch_embed(x, w_embed, b_embed, patch_size=4, backend=b),
                        (w_embed, b_embed)),
        "unpatchify": (lambda b: l2p.ops.unpatchify(tokens, w_head, b_head, patch_size=4, height=8,
                                                    width=12, backend=b), (w_head, b_head)),
        "attention": (lambda b: l2p.ops.attention(q, k, v, backend=b), (k,)),
    }


@pytest.mark.parametrize("op", ["patch_embed", "unpatchify", "attention"])
def test_fronts_follow_cpu_autocast(op):
    # The compiled kernels have no autocast rule: under autocast they refused bfloat16
    # activations with float32 weights (TypeError, whichever backend), and with float32 inputs
    # returned float32 where the torch way returns bfloat16.
    from l2p.ops import _extension

    if not _extension.is_compiled():
        pytest.skip("l2p._C is not built")
    call, params = _autocast_cases()[op]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {b: call(b) for b in ("cpp", "torch", "auto")}
    for b, out in outs.items():
        assert out.dtype == torch.bfloat16, (b, out.dtype)
        torch.testing.assert_close(out, outs["torch"], rtol=2e-2, atol=2e-2)
        grads = torch.autograd.grad(out.float().sum(), params)
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # Outside autocast the same mixed dtypes are still refused.
    with pytest.raises(TypeError, match="cast them to one dtype"):
        call("auto")


def test_fronts_follow_autocast_under_torch_compile():
    import l2p.ops

    from l2p.ops import _extension

    if not _extension.is_compiled():
        pytest.skip("l2p._C is not built")
    x, weight = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
    fn = torch.compile(lambda x: l2p.ops.patch_embed(x, weight, patch_size=4, backend="cpp"),
                       fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(x)
        want = l2p.ops.patch_embed(x, weight, patch_size=4, backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
