"""Nsight Compute profile of one unpatchify call per way at 4096^2, p=16, D=3072, bf16: the
Hopper fused GEMM (both schedules), the cuBLAS + fold path and torch's Linear + permute.

Warm-up calls run outside the profiled range; run under
    ncu --profile-from-start off --clock-control none --set full -o OUT python3 bench/gpu/profile_unpatchify.py
"""

from __future__ import annotations

import math
import os

import torch

import l2p.ops as ops
from l2p.ops.reference import unpatchify_reference

SIZE, PATCH, DIM = 4096, 16, 3072


def main() -> None:
    torch.manual_seed(0)
    tokens, features = (SIZE // PATCH) ** 2, 3 * PATCH * PATCH
    t = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(features, DIM, device="cuda") / math.sqrt(DIM)).to(torch.bfloat16)
    b = torch.randn(features, device="cuda", dtype=torch.bfloat16)

    def l2p(fused: str, schedule: str):
        os.environ["L2P_UNPATCHIFY_FUSED"] = fused
        os.environ["L2P_UNPATCHIFY_FUSED_SCHEDULE"] = schedule
        return ops.unpatchify(t, w, b, patch_size=PATCH, height=SIZE, width=SIZE, backend="cuda")

    ways = [lambda: l2p("1", "cooperative"), lambda: l2p("1", "pingpong"),
            lambda: l2p("0", "cooperative"),
            lambda: unpatchify_reference(t, w, b, PATCH, SIZE, SIZE)]
    for way in ways:
        for _ in range(5):
            way()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for way in ways:
        torch.cuda.nvtx.range_push("way")
        way()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
