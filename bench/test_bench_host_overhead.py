"""Host overhead of one op call: shapes so small that the kernels take a few microseconds, so
the time of a call is the work around them (argument checks, dispatch, autograd, allocation,
launches), against the torch way of the same job.

On CUDA each timed round issues 100 calls back to back and synchronizes once: the GPU work of
these shapes is shorter than their launches, so the figure is the host's time per call. A
pixel model makes few such calls per step (one patch embedding, one un-patchify), but for
small images and in sampling loops this is the part of an l2p call that torch's own ops do not
pay.

    pytest bench/test_bench_host_overhead.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import l2p.ops as ops

CALLS = 100

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.has_cuda_kernels() else [])
# The compiled kernels' dtype on each device: bf16 is what "auto" sends to the CUDA kernels.
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
BACKEND = {"cpu": "cpp", "cuda": "cuda"}


def _patch_case(device, requires_grad):
    dtype = DTYPE[device]
    x = torch.randn(1, 3, 16, 16, device=device, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(16, 3, 8, 8, device=device, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(16, device=device, dtype=dtype, requires_grad=requires_grad)
    tokens = torch.randn(1, 4, 16, device=device, dtype=dtype, requires_grad=requires_grad)
    wu = torch.randn(3 * 64, 16, device=device, dtype=dtype, requires_grad=requires_grad)
    return x, w, b, tokens, wu


def _ways(op, device, requires_grad):
    x, w, b, tokens, wu = _patch_case(device, requires_grad)
    backend = BACKEND[device]
    if op == "patch_embed":
        return {
            "l2p": lambda: ops.patch_embed(x, w, b, patch_size=8, backend=backend),
            "l2p op": lambda: torch.ops.l2p.patch_embed(x, w, b, 8),
            "torch": lambda: F.conv2d(x, w, b, stride=8).flatten(2).transpose(1, 2),
        }
    if op == "unpatchify":
        def linear_permute():
            y = F.linear(tokens, wu, None).reshape(1, 2, 2, 3, 8, 8)
            return y.permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 16, 16)

        return {
            "l2p": lambda: ops.unpatchify(tokens, wu, patch_size=8, height=16, width=16, backend=backend),
            "l2p op": lambda: torch.ops.l2p.unpatchify(tokens, wu, None, 8, 16, 16),
            "torch": linear_permute,
        }
    q, k, v = (torch.randn(1, 2, 16, 16, device=device, dtype=DTYPE[device], requires_grad=requires_grad)
               for _ in range(3))
    if op == "attention masked":
        # A key-padding mask, the shape a text encoder's attention mask takes in cross-attention;
        # "l2p op" gets the float32 additive mask the front builds from it, made once.
        keep = torch.ones(1, 1, 1, 16, device=device, dtype=torch.bool)
        keep[..., 12:] = False
        additive = torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
        additive = additive.expand(1, 2, 16, 16)
        return {
            "l2p": lambda: ops.attention(q, k, v, attn_mask=keep, backend=backend),
            "l2p op": lambda: torch.ops.l2p.attention_forward(q, k, v, additive, 0.25)[0],
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        }
    return {
        "l2p": lambda: ops.attention(q, k, v, backend=backend),
        "l2p op": lambda: torch.ops.l2p.attention_forward(q, k, v, None, 0.25)[0],
        "torch": lambda: F.scaled_dot_product_attention(q, k, v),
    }


def _timed(call, device, backward):
    def one():
        out = call()
        if backward:
            out.float().sum().backward()
        return out

    def rounds():
        for _ in range(CALLS):
            one()
        if device == "cuda":
            torch.cuda.synchronize()

    return rounds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("way", ["l2p", "l2p op", "torch"])
@pytest.mark.parametrize("op", ["patch_embed", "unpatchify", "attention", "attention masked"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_host_overhead(benchmark, mode, op, way, device):
    backward = mode == "forward+backward"
    call = _ways(op, device, requires_grad=backward)[way]
    benchmark.group = f"host overhead {op} {mode} {device} ({CALLS} calls)"
    benchmark.extra_info["baseline"] = way == "torch"
    benchmark.extra_info["calls"] = CALLS
    context = torch.enable_grad() if backward else torch.no_grad()
    # One CPU thread: at these sizes a thread pool only adds its own start-up to every call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with context:
            benchmark.pedantic(_timed(call, device, backward), rounds=20, warmup_rounds=3)
    finally:
        torch.set_num_threads(threads)
