"""l2p.ops.attention on the CPU (backend="cpp") against F.scaled_dot_product_attention
(backend="torch"), forward and forward + backward, plus the peak memory of each.

    pytest bench/test_bench_attention.py --benchmark-enable --benchmark-group-by=group -s

Each benchmark also prints its GFLOP/s at the best round: 4 * B * Hq * Nq * Nk * D for the
forward, 3.5x that for forward + backward (the backward's five products against the
forward's two). The CPU may be shared: compare min and median over the rounds.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from l2p.ops import _extension
from l2p.ops.attention import attention

pytestmark = pytest.mark.skipif(not _extension.is_compiled(), reason="l2p._C is not built")

BACKENDS = ["cpp", "torch"]

# name -> (batch, Hq, Hk, N, head dim, key-padding mask)
CASES = {
    "n4096": (1, 8, 8, 4096, 64, False),
    "n1024": (1, 8, 8, 1024, 64, False),
    "gqa8to2-n2048": (1, 8, 2, 2048, 64, False),
    "padmask-n2048": (2, 8, 8, 2048, 64, True),
}


def _inputs(case: str, requires_grad: bool = False):
    batch, hq, hk, n, d, padded = CASES[case]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, n, d, generator=gen)
    k = torch.randn(batch, hk, n, d, generator=gen)
    v = torch.randn(batch, hk, n, d, generator=gen)
    mask = None
    if padded:  # the second sample keeps only its first 3/4 of the keys
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool)
        mask[1:, ..., 3 * n // 4:] = False
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], mask


def _report(benchmark, capsys, case: str, flops: float) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    best = benchmark.stats.stats.min
    benchmark.extra_info["gflops_at_min"] = flops / best / 1e9
    with capsys.disabled():
        print(f"\n  {benchmark.name}: {flops / best / 1e9:.1f} GFLOP/s at the best round")


def _forward_flops(case: str) -> float:
    batch, hq, _, n, d, _ = CASES[case]
    return 4.0 * batch * hq * n * n * d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward(benchmark, capsys, case, backend):
    benchmark.group = f"attention forward {case}"
    (q, k, v), mask = _inputs(case)

    def run():
        with torch.no_grad():
            return attention(q, k, v, attn_mask=mask, backend=backend)

    benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    _report(benchmark, capsys, case, _forward_flops(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["n4096", "n1024", "gqa8to2-n2048"])
def test_forward_backward(benchmark, capsys, case, backend):
    benchmark.group = f"attention forward+backward {case}"
    (q, k, v), mask = _inputs(case, requires_grad=True)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],))

    def run():
        out = attention(q, k, v, attn_mask=mask, backend=backend)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _report(benchmark, capsys, case, 3.5 * _forward_flops(case))


_PEAK_SCRIPT = textwrap.dedent(
    """
    import torch
    from l2p.ops.attention import attention

    def high_water_mib():
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024

    heads, n, d, backward = {heads}, {n}, 64, {backward}
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=backward) for _ in range(3))
    small = [t[:, :, :256].detach().requires_grad_(backward) for t in (q, k, v)]
    out = attention(*small, backend="{backend}")  # load the kernels before measuring
    if backward:
        out.sum().backward()
    before = high_water_mib()
    with torch.set_grad_enabled(backward):
        out = attention(q, k, v, backend="{backend}")
        if backward:
            out.sum().backward()
    print(high_water_mib() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "heads, n, backward",
    [(1, 16384, False), (8, 4096, False), (8, 4096, True)],
    ids=["h1-n16384-forward", "h8-n4096-forward", "h8-n4096-forward+backward"],
)
def test_peak_memory(capsys, heads, n, backward, backend):
    """Growth of the peak resident memory of a fresh process over one call. The output and
    (backward) the gradients count in it: 2 MiB per (head, N=4096, D=64) tensor in float32.
    An Nq x Nk float32 buffer per head would be N^2 * 4 bytes (1 GiB at N=16384)."""
    script = _PEAK_SCRIPT.format(heads=heads, n=n, backward=backward, backend=backend)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600, check=True)
    growth = float(result.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n  peak RSS growth, {backend}, heads={heads}, N={n}, "
              f"{'forward+backward' if backward else 'forward'}: {growth:.1f} MiB")
    if backend == "cpp":
        assert growth < 64, f"{growth:.0f} MiB"
