"""Interleaved CPU timings of l2p's ops against the torch ways, for bench/RESULTS.md.

pytest-benchmark times one way after another; on a shared or throttling machine the load
drifts between them. Here every round times each way once, in turn (the order reversed every
other round), so drift hits all ways alike; the table gives medians over the rounds and each
way's speed relative to the torch way.

    python bench/interleaved.py [--rounds 25]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import l2p.ops


def _cases():
    x = torch.randn(1, 3, 1024, 1024)
    w = torch.randn(1152, 3, 16, 16) * 0.02
    b = torch.randn(1152)
    patches = F.unfold(x, 16, stride=16).transpose(1, 2)[0].contiguous()
    w2 = w.reshape(1152, -1)
    yield "patch_embed fwd, 1024px p16 D1152", "conv2d", {
        "l2p": lambda: l2p.ops.patch_embed(x, w, b, patch_size=16, backend="cpp"),
        "conv2d": lambda: F.conv2d(x, w, b, stride=16).flatten(2).transpose(1, 2),
        "unfold+matmul": lambda: torch.addmm(b, F.unfold(x, 16, stride=16).transpose(1, 2)[0], w2.t()),
        "matmul floor": lambda: torch.addmm(b, patches, w2.t()),
    }
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    out_l2p = l2p.ops.patch_embed(xg, wg, bg, patch_size=16, backend="cpp")
    out_conv = F.conv2d(xg, wg, bg, stride=16).flatten(2).transpose(1, 2)
    grad = torch.randn_like(out_l2p)
    yield "patch_embed bwd, 1024px p16 D1152", "conv2d", {
        "l2p": lambda: torch.autograd.grad(out_l2p, (xg, wg, bg), grad, retain_graph=True),
        "conv2d": lambda: torch.autograd.grad(out_conv, (xg, wg, bg), grad, retain_graph=True),
    }
    tokens = torch.randn(1, 4096, 1152)
    wu = torch.randn(768, 1152) * 0.02
    bu = torch.randn(768)
    yield "unpatchify fwd, 1024px p16 D1152", "linear+permute", {
        "l2p": lambda: l2p.ops.unpatchify(tokens, wu, bu, patch_size=16, height=1024, width=1024, backend="cpp"),
        "linear+permute": lambda: l2p.ops.unpatchify(tokens, wu, bu, patch_size=16, height=1024, width=1024, backend="torch"),
        "linear alone": lambda: F.linear(tokens, wu, bu),
    }
    # The attention shapes of bench/test_bench_attention.py: what `auto` decides on for the CPU.
    for batch, hq, hk, n, padded in ((1, 8, 8, 1024, False), (1, 8, 8, 4096, False),
                                     (1, 8, 2, 2048, False), (2, 8, 8, 2048, True)):
        yield from _attention_cases(batch, hq, hk, n, padded)


def _attention_cases(batch, hq, hk, n, padded):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, n, 64, generator=gen)
    k, v = (torch.randn(batch, hk, n, 64, generator=gen) for _ in range(2))
    mask = None
    if padded:  # the second sample keeps only its first 3/4 of the keys
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool)
        mask[1:, ..., 3 * n // 4:] = False
    name = f"B{batch} H{hq}" + (f"->{hk}" if hk != hq else "") + f" N{n} Dh64" + (" key-padding" if padded else "")
    # backend="torch" is SDPA after the same front, so the rows compare the kernels alone.
    yield f"attention fwd, {name}", "sdpa", {
        "l2p": lambda: l2p.ops.attention(q, k, v, attn_mask=mask, backend="cpp"),
        "sdpa": lambda: l2p.ops.attention(q, k, v, attn_mask=mask, backend="torch"),
    }
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)

    def fwd_bwd(backend):
        return lambda: torch.autograd.grad(
            l2p.ops.attention(qg, kg, vg, attn_mask=mask, backend=backend), (qg, kg, vg), go)

    yield f"attention fwd+bwd, {name}", "sdpa", {"l2p": fwd_bwd("cpp"), "sdpa": fwd_bwd("torch")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, {args.rounds} interleaved rounds\n")
    for title, baseline, ways in _cases():
        for fn in ways.values():  # warm-up
            fn()
        times = {name: [] for name in ways}
        order = list(ways.items())
        for round_ in range(args.rounds):
            # Reverse the order every other round: whichever way runs second finds the caches
            # and the clock as the first one left them.
            for name, fn in (order if round_ % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[baseline])
        print(f"### {title}\n\n| way | median | min | vs {baseline} |\n|---|---|---|---|")
        for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            med = statistics.median(ts)
            print(f"| {name} | {med * 1e3:.1f} ms | {min(ts) * 1e3:.1f} ms | {base / med:.2f}x |")
        print()


if __name__ == "__main__":
    main()
