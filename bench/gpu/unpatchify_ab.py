"""Interleaved GPU timings of unpatchify: the Hopper fused GEMM (both mainloop schedules)
against the cuBLAS + fold path it replaces, torch's Linear + permute and the GEMM alone, for
bench/RESULTS.md.

Every round times each way once, in turn (CUDA events around one call), so clock and
thermal drift hit all ways alike; the table gives the median and best of the rounds and each
way's median ratio to Linear + permute over the same rounds.

    python bench/gpu/unpatchify_ab.py [--rounds 60] [--sizes 4096,2048] [--patch 16] [--dim 3072]
"""

from __future__ import annotations

import argparse
import math
import os

import torch

import l2p.ops as ops
from l2p.ops.reference import unpatchify_reference

from ab_timing import interleaved_times, summary


def _fused_switch(schedule: str | None) -> None:
    """The kernel reads its switches on every call; None: the cuBLAS + fold path."""
    os.environ["L2P_UNPATCHIFY_FUSED"] = "1" if schedule else "0"
    os.environ["L2P_UNPATCHIFY_FUSED_SCHEDULE"] = schedule or "cooperative"


def ways(size: int, patch: int, dim: int, dtype: torch.dtype):
    tokens = (size // patch) ** 2
    features = 3 * patch * patch
    t = torch.randn(1, tokens, dim, device="cuda", dtype=dtype)
    w = (torch.randn(features, dim, device="cuda") / math.sqrt(dim)).to(dtype)
    b = torch.randn(features, device="cuda", dtype=dtype)

    def l2p(schedule: str | None):
        def call():
            _fused_switch(schedule)
            return ops.unpatchify(t, w, b, patch_size=patch, height=size, width=size,
                                  backend="cuda")
        return call

    return {
        "l2p, fused GEMM (cooperative)": l2p("cooperative"),
        "l2p, fused GEMM (pingpong)": l2p("pingpong"),
        "l2p, cuBLAS + fold": l2p(None),
        "linear+permute": lambda: unpatchify_reference(t, w, b, patch, size, size),
        "matmul only": lambda: torch.addmm(b, t[0], w.t()),
    }, 2.0 * tokens * features * dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--sizes", default="4096,2048")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=3072)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; "
          f"{args.rounds} interleaved rounds\n")
    print("| shape | impl | median ms | best ms | TFLOP/s (median) | median ratio to linear+permute |")
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        calls, flops = ways(size, args.patch, args.dim, torch.bfloat16)
        general_out = calls["l2p, cuBLAS + fold"]()
        for schedule in ("cooperative", "pingpong"):
            fused_out = calls[f"l2p, fused GEMM ({schedule})"]()
            torch.testing.assert_close(fused_out, general_out, rtol=1.6e-2, atol=1e-2)
        times = interleaved_times(calls, args.rounds)
        shape = f"{size}^2 p={args.patch} D={args.dim}"
        for name, median, best, tflops, ratio in summary(times, "linear+permute", flops):
            print(f"| {shape} | {name} | {median:.3f} | {best:.3f} | {tflops:.0f} | {ratio:.2f}x |", flush=True)
        os.environ.pop("L2P_UNPATCHIFY_FUSED", None)
        os.environ.pop("L2P_UNPATCHIFY_FUSED_SCHEDULE", None)
        del calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
