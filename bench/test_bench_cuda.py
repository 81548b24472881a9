"""GPU benchmarks under pytest-benchmark: l2p's CUDA kernels against the PyTorch ways (SDPA
with each backend, Conv2d, unfold + matmul, Linear + permute), bf16. Each timed call ends
with torch.cuda.synchronize, so a round is the kernel's time; benchmark.extra_info["tflops"]
holds the throughput. The cases are those of bench/cuda_report.py.

    pytest bench/test_bench_cuda.py --benchmark-enable --benchmark-json=bench-cuda.json
    python bench/report.py bench-cuda.json
"""

from __future__ import annotations

import pytest
import torch

import l2p.ops as ops

cuda_report = pytest.importorskip("cuda_report")  # bench/ is on sys.path under pytest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.has_cuda_kernels(), reason="l2p._C was built without CUDA kernels"),
]


def _run(benchmark, case) -> None:
    call = case.make(0)

    def synchronized():
        call()
        torch.cuda.synchronize()

    try:
        synchronized()  # warm-up; an unavailable SDPA backend raises here
    except RuntimeError as exc:
        pytest.skip(f"{case.impl} unavailable: {str(exc).strip().splitlines()[0][:120]}")
    if case.rounds > 1:
        benchmark(synchronized)
    else:
        benchmark.pedantic(synchronized, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["impl"] = case.impl
    benchmark.extra_info["shape"] = case.shape
    benchmark.extra_info["baseline"] = case.baseline
    if benchmark.stats is not None:  # None under --benchmark-disable
        tflops = case.flops / benchmark.stats.stats.median / 1e12
        benchmark.extra_info["tflops"] = round(tflops, 1)


def _ids(cases):
    return [f"{c.impl}-{c.shape}" for c in cases]


ATTN_FWD = [c for n in (4096, 16384) for c in cuda_report.attention_cases(n, backward=False)]
ATTN_FWD += cuda_report.attention_cases(4096, backward=False, head_dim=64)
ATTN_FWD_LONG = cuda_report.attention_cases(65536, backward=False, rounds=1)
ATTN_FWD_BWD = [c for n in (4096, 16384) for c in cuda_report.attention_cases(n, backward=True)]
ATTN_FWD_BWD += cuda_report.attention_cases(4096, backward=True, head_dim=64)
PATCH = [c for p in (16, 32, 64) for c in cuda_report.patch_embed_cases(patch=p)]
UNPATCH = cuda_report.unpatchify_cases()


@pytest.mark.parametrize("case", ATTN_FWD, ids=_ids(ATTN_FWD))
def test_attention_forward(benchmark, case):
    benchmark.group = f"attention forward {case.shape}"
    _run(benchmark, case)


@pytest.mark.parametrize("case", ATTN_FWD_LONG, ids=_ids(ATTN_FWD_LONG))
def test_attention_forward_65536(benchmark, case):
    benchmark.group = f"attention forward {case.shape}"
    _run(benchmark, case)


@pytest.mark.parametrize("case", ATTN_FWD_BWD, ids=_ids(ATTN_FWD_BWD))
def test_attention_forward_backward(benchmark, case):
    benchmark.group = f"attention fwd+bwd {case.shape}"
    _run(benchmark, case)


@pytest.mark.parametrize("case", PATCH, ids=_ids(PATCH))
def test_patch_embed(benchmark, case):
    benchmark.group = f"patch_embed {case.shape}"
    _run(benchmark, case)


@pytest.mark.parametrize("case", UNPATCH, ids=_ids(UNPATCH))
def test_unpatchify(benchmark, case):
    benchmark.group = f"unpatchify {case.shape}"
    _run(benchmark, case)
