"""Small calls of the Hopper wgmma attention kernels for compute-sanitizer (memcheck,
racecheck, synccheck; bench/gpu/wgmma_check.sh): ragged query blocks and key tiles, enough key
tiles (5) that every K and V buffer of the forward is refilled, GQA (several query heads per key
block in the backward), Dv != Dh, both 16-bit dtypes, DP 64 and 128.
Run on compute capability 9.0 (where both are the default)."""

import os

import torch

import l2p.ops  # noqa: F401  (loads l2p._C and registers torch.ops.l2p)

assert os.environ.get("L2P_ATTENTION_WGMMA", "1") != "0", "unset L2P_ATTENTION_WGMMA=0: it turns the wgmma kernels off"
assert os.environ.get("L2P_ATTENTION_WGMMA_BACKWARD", "1") != "0", "unset L2P_ATTENTION_WGMMA_BACKWARD=0"
assert torch.cuda.get_device_capability() == (9, 0), "the wgmma kernels need an H100/H200"
for dtype in (torch.bfloat16, torch.float16):
    # (Hq, Hk, Nq, Nk, Dh, Dv)
    for hq, hk, nq, nk, dh, dv in ((2, 1, 200, 600, 128, 128), (2, 2, 130, 70, 64, 40),
                                   (2, 1, 150, 333, 64, 64), (4, 2, 129, 257, 120, 112)):
        q = torch.randn(1, hq, nq, dh, device="cuda", dtype=dtype)
        k = torch.randn(1, hk, nk, dh, device="cuda", dtype=dtype)
        v = torch.randn(1, hk, nk, dv, device="cuda", dtype=dtype)
        scale = dh ** -0.5
        out, lse = torch.ops.l2p.attention_forward(q, k, v, None, scale)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        grads = torch.ops.l2p.attention_backward(torch.randn_like(out), q, k, v, out, lse, None, scale)
        assert all(torch.isfinite(g).all() for g in grads)
torch.cuda.synchronize()
print("wgmma smoke: all calls ran")
