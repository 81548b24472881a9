"""Interleaved GPU timings of the general patch ops at several chunk sizes (tokens per cuBLAS
GEMM; L2P_PATCH_CHUNK_TOKENS), against torch's way and the GEMM alone, for bench/RESULTS.md.

unpatchify projects each chunk into a scratch matrix that one kernel folds into the image;
patch_embed gathers each chunk's patches into a scratch matrix for the GEMM. Smaller chunks keep
the scratch in L2 (the fold or the GEMM then reads it from there) but give cuBLAS smaller GEMMs;
one chunk gives the largest GEMM and a scratch that goes through HBM. Every round times each way
once, in turn, each round starting at the next way (CUDA events around one call); the table gives the median and best of the rounds
and each way's median ratio to torch's way over the same rounds.

    python bench/gpu/patch_chunks_ab.py [--rounds 40] [--sizes 4096,2048] [--chunks 4096,...]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

import l2p.ops as ops
from l2p.ops.reference import unpatchify_reference

from ab_timing import interleaved_times, summary

KNOB = "L2P_PATCH_CHUNK_TOKENS"


def _set_chunk(chunk: int | None) -> None:
    if chunk is None:
        os.environ.pop(KNOB, None)
    else:
        os.environ[KNOB] = str(chunk)


def _chunked(call, chunk: int | None):
    """call() at this chunk size; the knob is set outside the timed region (ab_timing.time_once
    runs ``before`` first)."""
    def timed():
        _set_chunk(chunk)
        return call()
    timed.before = lambda: _set_chunk(chunk)
    return timed


def unpatchify_ways(size, patch, dim, chunks):
    tokens, features = (size // patch) ** 2, 3 * patch * patch
    t = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(features, dim, device="cuda") / math.sqrt(dim)).to(torch.bfloat16)
    b = torch.randn(features, device="cuda", dtype=torch.bfloat16)

    def l2p():
        return ops.unpatchify(t, w, b, patch_size=patch, height=size, width=size, backend="cuda")

    ways = {"l2p, default chunks": _chunked(l2p, None)}
    ways.update({f"l2p, {c} tokens per chunk": _chunked(l2p, c) for c in chunks})
    ways["torch: linear+permute"] = lambda: unpatchify_reference(t, w, b, patch, size, size)
    ways["matmul only"] = lambda: torch.addmm(b, t[0], w.t())
    return ways, 2.0 * tokens * features * dim


def patch_embed_ways(size, patch, dim, chunks):
    features = 3 * patch * patch
    x = torch.randn(1, 3, size, size, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(dim, 3, patch, patch, device="cuda") / math.sqrt(features)).to(torch.bfloat16)
    b = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    wt = w.reshape(dim, -1).t()
    unfolded = F.unfold(x, patch, stride=patch)[0].t().contiguous()

    def l2p():
        return ops.patch_embed(x, w, b, patch_size=patch, backend="cuda")

    ways = {"l2p, default chunks": _chunked(l2p, None)}
    ways.update({f"l2p, {c} tokens per chunk": _chunked(l2p, c) for c in chunks})
    ways["torch: unfold+matmul"] = lambda: torch.addmm(b, F.unfold(x, patch, stride=patch)[0].t(), wt)
    ways["matmul only"] = lambda: torch.addmm(b, unfolded, wt)
    return ways, 2.0 * (size // patch) ** 2 * features * dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sizes", default="4096,2048")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--chunks", default="4096,8192,16384,32768,65536")
    parser.add_argument("--calls", type=int, default=1,
                        help="back-to-back calls per timing (1: a lone call's latency)")
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    torch.manual_seed(0)
    print(f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; "
          f"{args.rounds} interleaved rounds of {args.calls} back-to-back call(s) per timing\n")
    print("| op | shape | impl | median ms | best ms | TFLOP/s (median) | median ratio to torch |")
    print("|---|---|---|---|---|---|---|")
    for op, make in (("unpatchify", unpatchify_ways), ("patch_embed", patch_embed_ways)):
        for size in (int(s) for s in args.sizes.split(",")):
            calls, flops = make(size, args.patch, args.dim, chunks)
            names = list(calls)
            torch_name = next(n for n in names if n.startswith("torch"))
            expected = calls["l2p, default chunks"]()
            for name in names:  # every chunking computes the same (cuBLAS may pick other kernels)
                if name.startswith("l2p"):
                    torch.testing.assert_close(calls[name](), expected, rtol=1.6e-2, atol=1e-2)
            times = interleaved_times(calls, args.rounds, args.calls, rotate=True)
            shape = f"{size}^2 p={args.patch} D={args.dim}"
            for name, median, best, tflops, ratio in summary(times, torch_name, flops):
                print(f"| {op} | {shape} | {name} | {median:.3f} | {best:.3f} | {tflops:.0f} | "
                      f"{ratio:.2f}x |", flush=True)
            os.environ.pop(KNOB, None)
            del calls, expected
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
