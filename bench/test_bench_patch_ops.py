"""Pixel projection microbenchmarks: l2p's fused kernels against the torch ways.

Run: ``pytest bench --benchmark-enable`` (``make bench``). Groups compare one job done
several ways; bench/report.py turns the JSON into the tables of bench/RESULTS.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import l2p.ops

CPU_SHAPE = dict(batch=1, channels=3, size=1024, patch=16, dim=1152)


def _inputs(batch, channels, size, patch, dim, dtype=torch.float32, device="cpu"):
    x = torch.randn(batch, channels, size, size, dtype=dtype, device=device)
    weight = torch.randn(dim, channels, patch, patch, dtype=dtype, device=device) * 0.02
    bias = torch.randn(dim, dtype=dtype, device=device)
    return x, weight, bias


@pytest.mark.benchmark(group="patch_embed cpu fp32 1024px p16 D1152")
@pytest.mark.parametrize("way", ["l2p", "conv2d", "unfold_matmul", "matmul_floor"])
def test_patch_embed_cpu(benchmark, way):
    x, weight, bias = _inputs(**CPU_SHAPE)
    p, dim = CPU_SHAPE["patch"], CPU_SHAPE["dim"]
    w2 = weight.reshape(dim, -1)
    if way == "l2p":
        fn = lambda: l2p.ops.patch_embed(x, weight, bias, patch_size=p, backend="cpp")  # noqa: E731
    elif way == "conv2d":
        fn = lambda: F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)  # noqa: E731
    elif way == "unfold_matmul":
        fn = lambda: torch.addmm(bias, F.unfold(x, p, stride=p).transpose(1, 2)[0], w2.t())  # noqa: E731
    else:  # the floor: the GEMM alone, on patches that are already unfolded
        patches = F.unfold(x, p, stride=p).transpose(1, 2)[0].contiguous()
        fn = lambda: torch.addmm(bias, patches, w2.t())  # noqa: E731
    benchmark.extra_info["baseline"] = way == "conv2d"
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)


@pytest.mark.benchmark(group="patch_embed backward cpu fp32 1024px p16 D1152")
@pytest.mark.parametrize("way", ["l2p", "conv2d"])
def test_patch_embed_backward_cpu(benchmark, way):
    x, weight, bias = _inputs(**CPU_SHAPE)
    p = CPU_SHAPE["patch"]
    for t in (x, weight, bias):
        t.requires_grad_(True)
    if way == "l2p":
        out = l2p.ops.patch_embed(x, weight, bias, patch_size=p, backend="cpp")
    else:
        out = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)
    grad = torch.randn_like(out)
    fn = lambda: torch.autograd.grad(out, (x, weight, bias), grad, retain_graph=True)  # noqa: E731
    benchmark.extra_info["baseline"] = way == "conv2d"
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)


@pytest.mark.benchmark(group="unpatchify cpu fp32 1024px p16 D1152")
@pytest.mark.parametrize("way", ["l2p", "linear_permute", "linear_alone"])
def test_unpatchify_cpu(benchmark, way):
    p, dim, size = CPU_SHAPE["patch"], CPU_SHAPE["dim"], CPU_SHAPE["size"]
    n = (size // p) ** 2
    tokens = torch.randn(1, n, dim)
    weight = torch.randn(3 * p * p, dim) * 0.02
    bias = torch.randn(3 * p * p)
    if way == "l2p":
        fn = lambda: l2p.ops.unpatchify(tokens, weight, bias, patch_size=p, height=size, width=size, backend="cpp")  # noqa: E731
    elif way == "linear_permute":
        fn = lambda: l2p.ops.unpatchify(tokens, weight, bias, patch_size=p, height=size, width=size, backend="torch")  # noqa: E731
    else:
        fn = lambda: F.linear(tokens, weight, bias)  # noqa: E731
    benchmark.extra_info["baseline"] = way == "linear_permute"
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
