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
