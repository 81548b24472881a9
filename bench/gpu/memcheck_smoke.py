"""Small CUDA calls of every l2p op, for compute-sanitizer memcheck (bench/gpu/device_run.sh)."""

import os

import torch

import l2p.ops

dev = "cuda"
for dtype in (torch.bfloat16, torch.float32):
    for dh in (36, 40, 128, 256):
        q = torch.randn(1, 4, 70, dh, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, 45, dh, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, 45, dh, device=dev, dtype=dtype, requires_grad=True)
        mask = torch.rand(1, 1, 1, 45, device=dev) > 0.3
        out = l2p.ops.attention(q, k, v, attn_mask=mask, backend="cuda")
        out.float().sum().backward()
    if dtype == torch.bfloat16:  # the unmasked tensor-core kernel: ragged row blocks and key tiles
        for dh in (64, 128):
            q, k, v = (torch.randn(1, 2, n, dh, device=dev, dtype=dtype, requires_grad=True) for n in (200, 130, 130))
            l2p.ops.attention(q, k, v, backend="cuda").float().sum().backward()
    x = torch.randn(2, 3, 48, 32, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(24, 3, 16, 16, device=dev, dtype=dtype, requires_grad=True)
    y = l2p.ops.patch_embed(x, w, patch_size=16, backend="cuda")
    y.float().sum().backward()
    wt = torch.randn(3 * 256, 24, device=dev, dtype=dtype, requires_grad=True)
    bt = torch.randn(3 * 256, device=dev, dtype=dtype, requires_grad=True)
    img = l2p.ops.unpatchify(y.detach().requires_grad_(), wt, bt, patch_size=16, height=48, width=32, backend="cuda")
    img.float().sum().backward()
    # The Hopper fused unpatchify (switched on here) with a tile short in both M and N
    # (3*8*8 = 192 features); elsewhere it declines and the general path runs.
    os.environ["L2P_UNPATCHIFY_FUSED"] = "1"
    for schedule in ("cooperative", "pingpong"):
        os.environ["L2P_UNPATCHIFY_FUSED_SCHEDULE"] = schedule
        tokens = torch.randn(3, 5 * 9, 24, device=dev, dtype=dtype)
        l2p.ops.unpatchify(tokens, torch.randn(192, 24, device=dev, dtype=dtype), torch.randn(192, device=dev, dtype=dtype),
                           patch_size=8, height=40, width=72, backend="cuda")
        l2p.ops.unpatchify(y.detach(), wt, bt, patch_size=16, height=48, width=32, backend="cuda")
    del os.environ["L2P_UNPATCHIFY_FUSED"], os.environ["L2P_UNPATCHIFY_FUSED_SCHEDULE"]
torch.cuda.synchronize()
print("memcheck smoke: all ops ran")
