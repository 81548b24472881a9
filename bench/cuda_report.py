"""Time l2p's CUDA kernels against the PyTorch ways on one GPU and print Markdown tables ready
for bench/RESULTS.md. Timing: CUDA events around each call, the median of 20 after warm-up;
inputs rotate through several copies where one set fits in L2, so no call finds its inputs
cached. bench/test_bench_cuda.py runs the same cases under pytest-benchmark.

    python bench/cuda_report.py            # everything (a few minutes on an H100/H200)
    python bench/cuda_report.py --quick    # skip N=65536 and the fwd+bwd at N=16384
    python bench/cuda_report.py --quick --only attention   # one kind of table
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import l2p.ops as ops
from l2p.ops.reference import patch_embed_reference, unpatchify_reference

DTYPE = torch.bfloat16
HEADS, HEAD_DIM = 24, 128
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
SDPA_DEFAULT = "sdpa, torch's choice"
# Forward + backward costs 3.5 forward passes (2.5 for the backward's five products).
FWD_BWD_FACTOR = 3.5


@dataclass
class Case:
    """One row: `make(i)` builds the i-th copy of the inputs and returns the call to time."""

    table: str
    shape: str
    impl: str
    flops: float
    input_bytes: int
    make: Callable[[int], Callable[[], object]]
    rounds: int = 20
    baseline: bool = False  # the torch way the table compares against (bench/report.py)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def attention_call(impl: str, q, k, v) -> Callable[[], torch.Tensor]:
    if impl == "l2p":
        return lambda: ops.attention(q, k, v, backend="cuda")
    if impl == SDPA_DEFAULT:  # what backend="torch" (and "auto" on CUDA) runs
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(impl)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


@contextlib.contextmanager
def env(name: str, value: str):
    """The l2p kernels read their switches on every call, so this changes the next calls."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def attention_cases(n: int, backward: bool, rounds: int = 20,
                    head_dim: int = HEAD_DIM) -> list[Case]:
    flops = 4.0 * HEADS * n * n * head_dim * (FWD_BWD_FACTOR if backward else 1.0)
    table = "attention forward+backward" if backward else "attention forward"
    impls = ["l2p", SDPA_DEFAULT, *SDPA_BACKENDS]
    if backward and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        # The same forward with the mma.sync backward instead of the Hopper wgmma one.
        impls.insert(1, "l2p, mma.sync backward")
    cases = []
    for impl in impls:

        def make(_copy: int, impl=impl):
            q, k, v = (
                torch.randn(1, HEADS, n, head_dim, device="cuda", dtype=DTYPE,
                            requires_grad=backward)
                for _ in range(3)
            )
            call = attention_call("l2p" if impl.startswith("l2p") else impl, q, k, v)
            if not backward:
                return call
            grad = torch.randn(1, HEADS, n, head_dim, device="cuda", dtype=DTYPE)
            if impl == "l2p, mma.sync backward":
                def run():
                    with env("L2P_ATTENTION_WGMMA_BACKWARD", "0"):
                        return torch.autograd.grad(call(), (q, k, v), grad)
                return run
            return lambda: torch.autograd.grad(call(), (q, k, v), grad)

        cases.append(Case(table, f"B=1 H={HEADS} N={n} Dh={head_dim}", impl, flops,
                          3 * n * HEADS * head_dim * 2, make, rounds, baseline=impl == "flash"))
    return cases


def patch_embed_cases(size: int = 4096, patch: int = 16, dim: int = 3072) -> list[Case]:
    tokens = (size // patch) ** 2
    features = 3 * patch * patch
    flops = 2.0 * tokens * features * dim
    shape = f"{size}^2 p={patch} D={dim}"

    def inputs():
        x = torch.randn(1, 3, size, size, device="cuda", dtype=DTYPE)
        w = torch.randn(dim, 3, patch, patch, device="cuda", dtype=DTYPE) / math.sqrt(features)
        b = torch.randn(dim, device="cuda", dtype=DTYPE)
        return x, w, b

    def l2p(_copy):
        x, w, b = inputs()
        return lambda: ops.patch_embed(x, w, b, patch_size=patch, backend="cuda")

    def conv(_copy):
        x, w, b = inputs()
        return lambda: patch_embed_reference(x, w, b, patch)

    def unfold(_copy):
        x, w, b = inputs()
        wt = w.reshape(dim, -1).t()
        return lambda: torch.addmm(b, F.unfold(x, patch, stride=patch)[0].t(), wt)

    def matmul(_copy):  # the GEMM alone on an already unfolded image: the floor
        x, w, b = inputs()
        a = F.unfold(x, patch, stride=patch)[0].t().contiguous()
        wt = w.reshape(dim, -1).t()
        return lambda: torch.addmm(b, a, wt)

    nbytes = 3 * size * size * 2
    return [
        Case("patch_embed", shape, name, flops, nbytes, make, baseline=name == "conv2d")
        for name, make in (("l2p", l2p), ("conv2d", conv), ("unfold+matmul", unfold),
                           ("matmul only", matmul))
    ]


def unpatchify_cases(size: int = 4096, patch: int = 16, dim: int = 3072) -> list[Case]:
    tokens = (size // patch) ** 2
    features = 3 * patch * patch
    flops = 2.0 * tokens * features * dim
    shape = f"{size}^2 p={patch} D={dim}"

    def inputs():
        t = torch.randn(1, tokens, dim, device="cuda", dtype=DTYPE)
        w = torch.randn(features, dim, device="cuda", dtype=DTYPE) / math.sqrt(dim)
        b = torch.randn(features, device="cuda", dtype=DTYPE)
        return t, w, b

    def l2p(_copy):
        t, w, b = inputs()
        return lambda: ops.unpatchify(t, w, b, patch_size=patch, height=size, width=size,
                                      backend="cuda")

    def l2p_switched(schedule: str | None):  # the Hopper fused GEMM; None: cuBLAS GEMM + fold
        def make(_copy):
            t, w, b = inputs()

            def run():
                with env("L2P_UNPATCHIFY_FUSED", "1" if schedule else "0"), \
                        env("L2P_UNPATCHIFY_FUSED_SCHEDULE", schedule or "cooperative"):
                    return ops.unpatchify(t, w, b, patch_size=patch, height=size, width=size,
                                          backend="cuda")
            return run
        return make

    def linear(_copy):
        t, w, b = inputs()
        return lambda: unpatchify_reference(t, w, b, patch, size, size)

    def matmul(_copy):
        t, w, b = inputs()
        return lambda: torch.addmm(b, t[0], w.t())

    nbytes = tokens * dim * 2
    return [
        Case("unpatchify", shape, name, flops, nbytes, make, baseline=name == "linear+permute")
        for name, make in (("l2p", l2p),
                           ("l2p, fused GEMM (cooperative)", l2p_switched("cooperative")),
                           ("l2p, fused GEMM (pingpong)", l2p_switched("pingpong")),
                           ("l2p, cuBLAS + fold", l2p_switched(None)),
                           ("linear+permute", linear), ("matmul only", matmul))
    ]


def all_cases(quick: bool = False) -> list[Case]:
    cases = []
    for n in (4096, 16384):
        cases += attention_cases(n, backward=False)
    cases += attention_cases(4096, backward=False, head_dim=64)  # SD3's head dim
    if not quick:
        cases += attention_cases(65536, backward=False, rounds=1)
    cases += attention_cases(4096, backward=True)
    cases += attention_cases(4096, backward=True, head_dim=64)  # SD3's head dim
    if not quick:
        cases += attention_cases(16384, backward=True, rounds=5)
    for p in (16, 32, 64):
        cases += patch_embed_cases(patch=p)
    cases += unpatchify_cases()
    return cases


def copies_for(case: Case) -> int:
    """Enough input copies that a rotation does not fit in L2 (one copy when one is larger)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    if case.input_bytes >= l2:
        return 1
    return min(8, math.ceil(2 * l2 / max(case.input_bytes, 1)))


def time_ms(case: Case, warmup: int = 3) -> float:
    """Median milliseconds of one call, by CUDA events."""
    calls = [case.make(i) for i in range(copies_for(case))]
    for i in range(warmup if case.rounds > 1 else 1):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    times = []
    for i in range(case.rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del calls
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the longest cases")
    parser.add_argument("--only", metavar="TEXT", default="",
                        help="only the tables whose title contains TEXT (e.g. attention)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if not ops.has_cuda_kernels():
        raise SystemExit("l2p._C was built without CUDA kernels: rebuild with L2P_CUDA=1")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"Device: {device}; torch {torch.__version__}; bf16; median of CUDA-event timings\n")
    current = None
    for case in all_cases(args.quick):
        if args.only not in case.table:
            continue
        if case.table != current:
            current = case.table
            print(f"\n### {current}\n")
            print("| shape | impl | ms | TFLOP/s |")
            print("|---|---|---|---|")
        try:
            ms = time_ms(case)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. an SDPA backend missing
            text = str(exc).strip()
            first = text.splitlines()[0][:80] if text else type(exc).__name__
            print(f"| {case.shape} | {case.impl} | n/a ({first}) | |")
            torch.cuda.empty_cache()
            continue
        print(f"| {case.shape} | {case.impl} | {ms:.3f} | {case.flops / ms / 1e9:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
