"""Interleaved GPU timing shared by the A/B scripts beside this file (unpatchify_ab.py,
patch_chunks_ab.py).

Every round times each way once, in turn, so clock and thermal drift hit all ways alike; a way's
figures are the median and best of its rounds and its median ratio to a baseline way over the
same rounds.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def time_once(call: Callable, calls: int = 1) -> float:
    """Milliseconds per call over ``calls`` back-to-back calls between two CUDA events: with one,
    the latency of a lone call (the GPU waits for each launch); with several, the launches of the
    next calls overlap the GPU work of the earlier ones, as inside a model's forward. A
    ``call.before()``, if there is one, runs first, outside the timed region."""
    getattr(call, "before", lambda: None)()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def interleaved_times(ways: dict[str, Callable], rounds: int, calls: int = 1,
                      rotate: bool = False) -> dict[str, list[float]]:
    """Each way's per-round timings after three warm-up calls each; ``rotate`` starts each round
    at the next way, so that no way always runs first."""
    for call in ways.values():
        for _ in range(3):
            call()
    names = list(ways)
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(ways[name], calls))
    return times


def summary(times: dict[str, list[float]], baseline: str, flops: float):
    """(name, median ms, best ms, TFLOP/s at the median, median ratio to ``baseline``) per way."""
    base = times[baseline]
    for name, ts in times.items():
        median = statistics.median(ts)
        yield (name, median, min(ts), flops / median / 1e9,
               statistics.median(b / t for b, t in zip(base, ts)))
