"""l2p.ops.attention on every available device: the compiled kernel (backend="cpp" on the
CPU, "cuda" on a GPU) against attention_reference, the op contract (opcheck, gradcheck), the
errors of the Python front and of the kernels, and the O(N) memory promise.

Tolerances, against the float64 reference on the same (rounded) inputs and relative to the
largest reference value of each tensor (worst error seen over the sweep in brackets):
float32 1e-5 (1.2e-6); float16 2e-3 (4.4e-4); bfloat16 1e-2 (4.5e-3: the output is rounded to
8 mantissa bits and the backward reads that rounded output).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from l2p.ops import _extension
from l2p.ops.attention import attention
from l2p.ops.reference import attention_reference

from _isolated import assert_raises_each
from _masks import finfo_min_case


@pytest.fixture
def backend(device, compiled_backend) -> str:
    """The compiled attention backend of ``device``; skips where l2p._C lacks its kernel."""
    key = "CUDA" if device == "cuda" else "CPU"
    if not (_extension.is_compiled()
            and torch._C._dispatch_has_kernel_for_dispatch_key("l2p::attention_forward", key)):
        pytest.skip(f"l2p._C with the {key} attention kernel is not built")
    return compiled_backend

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _qkv(batch, hq, hk, nq, nk, dh, dv, dtype=torch.float32, requires_grad=False, device="cpu"):
    q = torch.randn(batch, hq, nq, dh, dtype=dtype)
    k = torch.randn(batch, hk, nk, dh, dtype=dtype)
    v = torch.randn(batch, hk, nk, dv, dtype=dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (q, k, v)]


def _make_mask(kind, batch, hq, nq, nk, device="cpu"):
    mask = _make_cpu_mask(kind, batch, hq, nq, nk)
    return None if mask is None else mask.to(device)


def _make_cpu_mask(kind, batch, hq, nq, nk):
    """None; "padding": a random boolean key-padding mask (B, 1, 1, Nk) with the last batch
    entry fully padded; "lengths": sample 0 keeps only its first Nk // 5 keys (whole key
    tiles padded); "full": an additive (B, Hq, Nq, Nk) float mask with some -inf and one
    fully masked row."""
    if kind is None:
        return None
    if kind == "lengths":
        keep = torch.ones(batch, 1, 1, nk, dtype=torch.bool)
        keep[0, ..., nk // 5:] = False
        return keep
    if kind == "padding":
        keep = torch.rand(batch, 1, 1, nk) > 0.3
        keep[0, ..., 0] = True
        if batch > 1:
            keep[-1] = False  # every query of the last sample attends to nothing
        return keep
    mask = torch.randn(batch, hq, nq, nk)
    mask[torch.rand(batch, hq, nq, nk) < 0.2] = float("-inf")
    mask[0, 0, nq // 2] = float("-inf")
    return mask


def _additive(mask, q, k):
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(torch.float32).expand(target)


def _reference(q, k, v, mask, scale, grad_out):
    """Float64 output, lse and gradients of attention_reference. Autograd through its
    logsumexp gives NaN on a fully masked row, whose true gradient is 0: such rows are
    unmasked and get no upstream gradient, which leaves every gradient unchanged. Computed on
    the CPU whatever the device of the inputs."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    mask = None if mask is None else mask.cpu()
    grad_out = grad_out.cpu()
    additive = _additive(mask, q64, k64)
    out, lse = attention_reference(q64, k64, v64, additive, scale)
    grad_mask, grad = additive, grad_out.double()
    if additive is not None:
        dead = torch.isneginf(additive).all(dim=-1, keepdim=True)
        grad_mask = additive.masked_fill(dead, 0.0)
        grad = grad.masked_fill(dead, 0.0)
    out_g, _ = attention_reference(q64, k64, v64, grad_mask, scale)
    grads = torch.autograd.grad(out_g, (q64, k64, v64), grad)
    return out.detach(), lse, grads


def _assert_close(actual, expected, tol, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    both_inf = torch.isinf(actual) & (actual == expected)
    err = (actual - expected).masked_fill(both_inf, 0.0).abs().max().item()
    # The floor covers gradients that are 0 in exact arithmetic (a single key: dq = 0).
    limit = tol * max(expected[torch.isfinite(expected)].abs().max().item(), 0.1)
    assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g}"


# (batch, Hq, Hk, Nq, Nk, Dh, Dv, mask): odd lengths that are not multiples of any tile,
# Nq != Nk, head dims from 16 to 256, Dv != Dh, grouped-query heads.
SWEEP = [
    (1, 1, 1, 1, 1, 16, 16, None),
    (2, 4, 2, 100, 77, 40, 40, "padding"),
    (1, 3, 1, 131, 600, 80, 80, "full"),
    (2, 2, 2, 257, 129, 96, 64, "padding"),
    (1, 2, 1, 65, 515, 100, 100, None),
    (1, 1, 1, 33, 70, 256, 256, "full"),
    (1, 4, 2, 50, 1030, 64, 128, "full"),
    (1, 4, 4, 200, 200, 17, 33, None),
    (3, 6, 3, 129, 513, 32, 32, "padding"),
    (2, 4, 2, 70, 1300, 32, 24, "lengths"),
    # Unmasked, head dims the GPU's register-tiled kernel takes (multiples of 8 up to 128):
    # several 128-row query blocks, whole and ragged 64-key tiles.
    (2, 4, 2, 300, 333, 64, 64, None),
    (1, 3, 3, 257, 190, 128, 128, None),
    (1, 2, 1, 256, 128, 120, 112, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", SWEEP, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(case, dtype, device, backend):
    batch, hq, hk, nq, nk, dh, dv, mask_kind = case
    q, k, v = _qkv(batch, hq, hk, nq, nk, dh, dv, dtype, requires_grad=True, device=device)
    mask = _make_mask(mask_kind, batch, hq, nq, nk, device)
    scale = 1.0 / math.sqrt(dh)
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    ref_out, ref_lse, ref_grads = _reference(q, k, v, mask, scale, grad_out)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == (batch, hq, nq, dv)
    _assert_close(out, ref_out, tol, "out")
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype
        _assert_close(g, ref_g, tol, name)
    _, lse = torch.ops.l2p.attention_forward(q, k, v, _additive(mask, q, k), scale)
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(ref_lse))
    _assert_close(lse, ref_lse, 1e-5, "lse")


def test_fully_masked_rows_give_zeros_and_finite_gradients(device, backend):
    q, k, v = _qkv(2, 2, 1, 9, 11, 8, 8, requires_grad=True, device=device)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool, device=device)
    mask[1] = False
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    _, lse = torch.ops.l2p.attention_forward(q, k, v, _additive(mask, q, k), 0.5)
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()


def test_non_contiguous_inputs(device, backend):
    # (B, N, H, D) storage seen as (B, H, N, D): the layout of a fused qkv projection.
    q = torch.randn(2, 70, 4, 32, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 90, 2, 32, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 2, 48, 90, device=device).transpose(2, 3).requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention(q, k, v, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, _, ref_grads = _reference(q, k, v, None, 32**-0.5, grad_out)
    _assert_close(out, ref_out, 1e-5, "out")
    for name, g, ref_g, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.shape == t.shape
        _assert_close(g, ref_g, 1e-5, name)


def test_float64_forward_is_exact(device, backend):
    q, k, v = _qkv(1, 4, 2, 45, 130, 24, 20, torch.float64, device=device)
    mask = _make_mask("full", 1, 4, 45, 130, device)
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    ref, _ = attention_reference(q, k, v, mask.double(), 24**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape, mask_kind",
    [((1, 2, 1, 5, 7, 4, 3), None), ((2, 2, 2, 6, 4, 3, 5), "full"),
     ((2, 4, 2, 3, 9, 4, 4), "padding")],
    ids=["gqa", "mask", "gqa-padding"],
)
def test_gradcheck(shape, mask_kind, device, backend):
    batch, hq, hk, nq, nk, dh, dv = shape
    q, k, v = _qkv(batch, hq, hk, nq, nk, dh, dv, torch.float64, requires_grad=True, device=device)
    mask = _make_mask(mask_kind, batch, hq, nq, nk, device)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, attn_mask=mask, backend=backend), (q, k, v)
    )


@pytest.mark.parametrize(
    "shape, mask_kind",
    [((1, 2, 2, 8, 8, 16, 16), None), ((2, 4, 2, 10, 21, 8, 12), "full"),
     ((2, 2, 1, 17, 5, 8, 8), "padding")],
    ids=["plain", "gqa-mask", "nq-ne-nk-padding"],
)
def test_opcheck(shape, mask_kind, device, backend):
    batch, hq, hk, nq, nk, dh, dv = shape
    q, k, v = _qkv(batch, hq, hk, nq, nk, dh, dv, requires_grad=True, device=device)
    mask = _additive(_make_mask(mask_kind, batch, hq, nq, nk, device), q, k)
    torch.library.opcheck(torch.ops.l2p.attention_forward.default, (q, k, v, mask, dh**-0.5))


def test_opcheck_backward(device, backend):
    q, k, v = _qkv(2, 4, 2, 10, 21, 8, 12, device=device)
    mask = _additive(_make_mask("full", 2, 4, 10, 21, device), q, k)
    out, lse = torch.ops.l2p.attention_forward(q, k, v, mask, 0.3)
    args = (torch.randn_like(out), q, k, v, out, lse, mask, 0.3)
    torch.library.opcheck(torch.ops.l2p.attention_backward.default, args)


def _bad(**overrides):
    shapes = {"q": (1, 4, 8, 16), "k": (1, 2, 8, 16), "v": (1, 2, 8, 16)}
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    tensors.update(overrides)
    return tensors


@pytest.mark.parametrize(
    "inputs, kwargs, error, match",
    [
        (_bad(q=torch.randn(4, 8, 16)), {}, ValueError, r"\(B, H, N, D\)"),
        (_bad(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), {}, ValueError,
         "multiple"),
        (_bad(k=torch.randn(1, 2, 8, 16, dtype=torch.float64)), {}, TypeError, "dtype"),
        (_bad(q=torch.randn(1, 4, 0, 16)), {}, ValueError, "empty"),
        (_bad(), {"attn_mask": torch.ones(1, 1, 1, 9, dtype=torch.bool)}, ValueError,
         "broadcast"),
        (_bad(q=torch.randn(1, 4, 8, 264), k=torch.randn(1, 2, 8, 264)), {}, ValueError,
         "exceeds 256"),
        (_bad(q=torch.ones(1, 4, 8, 16, dtype=torch.int64)), {}, TypeError, "floating"),
        (_bad(), {"attn_mask": torch.ones(1, 1, 1, 8, dtype=torch.int32)}, TypeError,
         "bool or floating"),
    ],
    ids=["rank", "heads", "dtype", "empty", "mask-shape", "head-dim", "int", "mask-dtype"],
)
def test_front_rejects_bad_inputs(inputs, kwargs, error, match, device, backend):
    moved = {name: t.to(device) for name, t in inputs.items()}
    kwargs = {name: t.to(device) for name, t in kwargs.items()}
    with pytest.raises(error, match=match):
        attention(moved["q"], moved["k"], moved["v"], backend=backend, **kwargs)


def test_only_the_compiled_kernels_get_an_additive_mask(device, compiled_backend, monkeypatch):
    # torch's SDPA takes the boolean mask as given: building the float32 copy the compiled
    # kernels read would be an allocation and two kernels for nothing.
    import importlib

    front = importlib.import_module("l2p.ops.attention")  # the module; l2p.ops.attention is the function

    q, k, v = (torch.randn(1, 2, 8, 16, device=device) for _ in range(3))
    mask = torch.rand(1, 1, 1, 8, device=device) > 0.3
    built = []
    real = front._additive_mask
    monkeypatch.setattr(front, "_additive_mask", lambda *a: built.append(1) or real(*a))
    ours = attention(q, k, v, attn_mask=mask, backend=compiled_backend)
    assert built == [1]
    theirs = attention(q, k, v, attn_mask=mask, backend="torch")
    assert built == [1]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_inputs(device, backend):
    """Direct torch.ops calls skip the Python front: the kernel checks on its own."""
    t = "torch.randn({}, device=device)"
    call = "torch.ops.l2p.attention_forward({}, {}, {}, None, 1.0)"
    assert_raises_each(device, [
        (call.format(t.format("4, 8, 16"), t.format("1, 2, 8, 16"), t.format("1, 2, 8, 16")),
         ValueError, "l2p"),                                           # rank
        (call.format(t.format("1, 3, 8, 16"), t.format("1, 2, 8, 16"), t.format("1, 2, 8, 16")),
         ValueError, "l2p"),                                           # heads
        (call.format(t.format("1, 2, 8, 16"), t.format("1, 2, 8, 8"), t.format("1, 2, 8, 16")),
         ValueError, "l2p"),                                           # head dim
        (call.format(t.format("1, 2, 8, 16"), t.format("1, 2, 9, 16"), t.format("1, 2, 8, 16")),
         ValueError, "l2p"),                                           # key/value length
        (call.format(t.format("1, 2, 8, 16"), t.format("1, 2, 8, 16") + ".double()",
                     t.format("1, 2, 8, 16")), TypeError, "l2p"),     # dtype
    ])


def test_kernel_rejects_bad_mask_and_lse(device, backend):
    setup = ("q, k, v = (torch.randn(1, 2, 8, 16, device=device) for _ in range(3)); "
             "out, lse = torch.ops.l2p.attention_forward(q, k, v, None, 1.0); ")
    assert_raises_each(device, [
        (setup + "torch.ops.l2p.attention_forward(q, k, v, torch.zeros(1, 2, 8, 8, device=device).double(), 1.0)",
         TypeError, "float32"),
        (setup + "torch.ops.l2p.attention_forward(q, k, v, torch.zeros(1, 1, 1, 8, device=device), 1.0)",
         ValueError, "attn_mask"),
        (setup + "torch.ops.l2p.attention_backward(out, q, k, v, out, lse.double(), None, 1.0)",
         TypeError, "lse"),
        (setup + "torch.ops.l2p.attention_backward(out[:, :1], q, k, v, out, lse, None, 1.0)",
         ValueError, "grad_out"),
    ])


def test_empty_key_set_gives_zeros(device, backend):
    q, k, v = _qkv(1, 2, 2, 5, 0, 8, 8, device=device)
    out, lse = torch.ops.l2p.attention_forward(q, k, v, None, 1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch, l2p.ops

    def high_water_mib():
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmHWM"))
        return int(line.split()[1]) / 1024

    n, d = {n}, 32
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    small = [t[:, :, :64].detach().requires_grad_() for t in (q, k, v)]
    torch.ops.l2p.attention_forward(*small, None, 0.1)[0].sum().backward()  # warm up
    before = high_water_mib()
    out, _ = torch.ops.l2p.attention_forward(q, k, v, None, 0.1)
    out.sum().backward()
    print(high_water_mib() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(not _extension.is_compiled(), reason="l2p._C is not built")
def test_memory_does_not_scale_with_n_squared():
    """Forward + backward at N=8192 on one head: an Nq x Nk float32 buffer would be 256 MiB;
    the peak resident memory of a fresh process may grow by far less."""
    n = 8192
    script = _PEAK_MEMORY_SCRIPT.format(n=n)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=True)
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB (N^2 floats = 256 MiB)"


def test_cuda_memory_does_not_scale_with_n_squared(device, backend):
    """Forward + backward at N=16384 on one head in bf16: N^2 scores would take 512 MiB of GPU
    memory; the peak above the inputs stays a small multiple of the inputs (6 MiB)."""
    if device != "cuda":
        pytest.skip("measures GPU memory")
    q, k, v = _qkv(1, 1, 1, 16384, 16384, 64, 64, torch.bfloat16, requires_grad=True, device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    attention(q, k, v, backend=backend).sum().backward()
    torch.cuda.synchronize()
    growth_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert growth_mib < 64, f"peak GPU memory grew by {growth_mib:.0f} MiB (N^2 bf16 = 512 MiB)"


def test_mask_that_requires_grad_gets_its_gradient(device, backend):
    # The compiled kernels give no mask gradient: "auto" takes the torch path for such a mask,
    # an explicit compiled backend refuses it instead of leaving the mask untrained.
    q, k, v = _qkv(1, 2, 2, 5, 6, 8, 8, device=device)
    bias = torch.randn(1, 2, 5, 6, device=device, requires_grad=True)
    out = attention(q, k, v, attn_mask=bias, backend="auto")
    (grad,) = torch.autograd.grad(out.sum(), bias)
    (want,) = torch.autograd.grad(attention(q, k, v, attn_mask=bias, backend="torch").sum(), bias)
    torch.testing.assert_close(grad, want)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="backend='torch' or 'auto'"):
        attention(q, k, v, attn_mask=bias, backend=backend)
    with torch.no_grad():  # no gradient wanted: the compiled path is fine
        attention(q, k, v, attn_mask=bias, backend=backend)


def test_second_derivatives_are_refused_on_the_compiled_path(device, backend):
    q, k, v = _qkv(1, 1, 1, 3, 4, 4, 4, torch.float64, requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match="second derivatives through l2p.ops.attention.*"
                                           "backend='torch' inside .*MATH"):
        torch.autograd.grad(attention(q, k, v, backend=backend).square().sum(), (q, k, v),
                            create_graph=True)
    # SDPA's fused kernels have no second derivative: its math backend, which the message
    # names, has.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        grads = torch.autograd.grad(attention(q, k, v, backend="torch").square().sum(),
                                    (q, k, v), create_graph=True)
        assert all(g.requires_grad for g in grads)
        assert torch.autograd.gradgradcheck(lambda *t: attention(*t, backend="torch"), (q, k, v))


def test_compiles_under_torch_compile_forward_and_backward():
    q, k, v = _qkv(1, 2, 1, 7, 9, 8, 8, requires_grad=True)
    mask = torch.randn(1, 1, 7, 9)
    fn = torch.compile(lambda q, k, v: attention(q, k, v, attn_mask=mask, backend="cpp"),
                       fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))
    want = torch.autograd.grad(attention(q, k, v, attn_mask=mask, backend="cpp").sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("shape", [(), (9,), (7, 9), (1, 7, 9)], ids=["0d", "1d", "2d", "3d"])
def test_masks_of_fewer_dims_give_the_same_answer_on_every_backend(shape, device, backend):
    q, k, v = _qkv(2, 2, 1, 7, 9, 8, 8, device=device)
    for dtype in (torch.float32, torch.bool):
        mask = torch.randn(shape, device=device)
        mask = mask > -0.5 if dtype == torch.bool else mask
        if dtype == torch.bool and mask.dim() > 0:
            mask[..., 0] = True
        outs = [attention(q, k, v, attn_mask=mask, backend=b) for b in (backend, "torch", "auto")]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_sdpa_on_fully_masked_rows(dtype):
    # Rows fully at a large finite value (-1e9, finfo.min: lse rounds back to the row max, so
    # exp(s - lse) summed V instead of averaging it) and rows fully at -inf (NaN gradients).
    import torch.nn.functional as F

    q, k, v = _qkv(1, 2, 2, 6, 5, 8, 8, dtype, requires_grad=True)
    mask = torch.randn(1, 2, 6, 5, dtype=dtype)
    mask[0, 0, 1] = -1e9
    mask[0, 1, 2] = torch.finfo(torch.float32).min
    mask[0, 0, 3] = float("-inf")
    mask[0, 1, 4, :3] = -1e9
    out, lse = attention_reference(q, k, v, mask)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want)
    if dtype == torch.float32:  # the scores vanish beside -1e9: the row averages V
        torch.testing.assert_close(out[0, 0, 1], v[0, 0].mean(0))
    torch.testing.assert_close(out[0, 1, 2], v[0, 1].mean(0))
    assert torch.isneginf(lse[0, 0, 3]) and torch.equal(out[0, 0, 3], torch.zeros(8, dtype=dtype))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nk", [5, 300])  # one key tile; several (the backward's are 128)
def test_finfo_min_masks_match_the_reference(dtype, nk):
    # log2(e) * finfo.min overflowed to -inf in the kernel, so a row fully at finfo.min gave
    # zeros where the reference and SDPA average V; and the backward, whose saved lse cannot
    # hold the row sum at that magnitude, got every probability as 1.
    q, k, v, mask = finfo_min_case(dtype, nk, head_dim=16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, attn_mask=mask, backend="cpp")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # The reference in float32, the precision whose rounding defines these rows.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q32, k32, v32, mask)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_close(out, ref, tol, "out")
    torch.testing.assert_close(out[0, 0, 1].float(), v32[0, 0].mean(0).detach(), rtol=tol, atol=tol)
    assert torch.equal(out[0, 0, 3], torch.zeros_like(out[0, 0, 3]))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        _assert_close(g, r, tol, name)
    assert torch.equal(grads[0][0, 0, 3], torch.zeros_like(grads[0][0, 0, 3]))


def test_dq_is_the_same_on_every_run():
    # One (batch, head) group whose key tiles several threads share: their dQ parts were added
    # under a lock in arrival order, so dq differed run to run in the last bits.
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        q = torch.randn(1, 1, 256, 32)
        k, v = torch.randn(1, 1, 1030, 32), torch.randn(1, 1, 1030, 32)
        out, lse = torch.ops.l2p.attention_forward(q, k, v, None, 0.2)
        grad_out = torch.randn_like(out)
        dqs = [torch.ops.l2p.attention_backward(grad_out, q, k, v, out, lse, None, 0.2)[0]
               for _ in range(10)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(dq, dqs[0]) for dq in dqs[1:])


@pytest.mark.parametrize("dtype, mask_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float64, torch.float64),
                                               (torch.float32, torch.float64)],
                         ids=["bf16-f32mask", "f64-f64mask", "f32-f64mask"])
def test_mask_values_beyond_the_compute_dtype_stay_finite(dtype, mask_dtype, device, backend):
    # A mask cast to a narrower dtype (to q's for SDPA, to float32 for the kernels) turned
    # finfo(mask dtype).min into -inf: the row gave zeros on that path and averaged V on the other.
    q, k, v = _qkv(1, 2, 2, 5, 6, 8, 8, dtype, device=device)
    mask = torch.zeros(1, 1, 5, 6, dtype=mask_dtype, device=device)
    mask[0, 0, 1] = torch.finfo(mask_dtype).min
    tol = TOLERANCE.get(dtype, 1e-6)
    for b in (backend, "torch", "auto"):
        out = attention(q, k, v, attn_mask=mask, backend=b)
        torch.testing.assert_close(out[0, :, 1].float(), v[0].float().mean(dim=1),
                                   rtol=tol, atol=tol, msg=lambda m: f"backend={b}: {m}")


@pytest.mark.parametrize("mask_kind", [None, "full", "padding"])
def test_float64_backward_is_exact(mask_kind, device, backend, request):
    # The backward read the float32 logsumexp saved by the forward, so float64 gradients were
    # only float32-accurate (errors near 1e-7).
    request.applymarker(pytest.mark.xfail(
        device == "cuda", strict=False,
        reason="the CUDA backward reads the float32 logsumexp for float64 too (not run on a GPU)"))
    q, k, v = _qkv(2, 4, 2, 45, 130, 24, 20, torch.float64, requires_grad=True, device=device)
    mask = _make_mask(mask_kind, 2, 4, 45, 130, device)
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _, _, ref_grads = _reference(q, k, v, mask, 24**-0.5, grad_out)
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g.cpu(), ref_g, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_scale_takes_numpy_floats(device, backend):
    # np.float32 is not a Python float: the front refused it as "not a finite number", where
    # SDPA (and so a model whose attention is routed to l2p) takes it.
    import numpy as np

    q, k, v = _qkv(1, 2, 2, 5, 6, 8, 8, device=device)
    want = attention(q, k, v, scale=0.3, backend="torch")
    for scale in (np.float32(0.3), np.float64(0.3)):
        for b in (backend, "torch"):
            torch.testing.assert_close(attention(q, k, v, scale=scale, backend=b), want)
    for bad in (float("nan"), True, "0.3", np.float32("inf")):
        with pytest.raises(ValueError, match="scale must be a finite real number"):
            attention(q, k, v, scale=bad, backend=backend)


def test_huge_positive_mask_value_gives_its_key_the_row(device, backend):
    # log2(e) * 3e38 overflowed to +inf in the kernel: the row's maximum became +inf and every
    # probability inf - inf = NaN, where SDPA and the reference give that key all the weight.
    q, k, v = _qkv(1, 2, 2, 5, 6, 8, 8, requires_grad=True, device=device)
    mask = torch.zeros(1, 1, 5, 6, device=device)
    mask[0, 0, 2, 3] = 3e38
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    want = attention(q, k, v, attn_mask=mask, backend="torch")
    torch.testing.assert_close(out[0, :, 2], v[0, :, 3].detach())
    torch.testing.assert_close(out, want)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fake_kernels_refuse_what_the_kernels_refuse():
    # Meta tensors run the fake kernels: they traced a shape for any arguments ((2, 4, 8, 8) for a
    # 3-D q, say) where the real kernels refuse them.
    if not _extension.is_compiled():
        pytest.skip("l2p._C is not built")
    ops = torch.ops.l2p

    def e(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    fwd = ops.attention_forward
    bad = [
        (lambda: fwd(e(2, 4, 8), e(1, 2, 4, 8), e(1, 2, 4, 8), None, 1.0), ValueError),
        (lambda: fwd(e(1, 3, 4, 8), e(1, 2, 4, 8), e(1, 2, 4, 8), None, 1.0), ValueError),
        (lambda: fwd(e(1, 2, 4, 8), e(1, 2, 4, 6), e(1, 2, 4, 8), None, 1.0), ValueError),
        (lambda: fwd(e(1, 2, 4, 8), e(1, 2, 5, 8), e(1, 2, 4, 8), None, 1.0), ValueError),
        (lambda: fwd(e(2, 2, 4, 8), e(1, 2, 4, 8), e(1, 2, 4, 8), None, 1.0), ValueError),
        (lambda: fwd(e(1, 2, 4, 8), e(1, 2, 4, 8), e(1, 2, 4, 0), None, 1.0), ValueError),
        (lambda: fwd(e(1, 2, 4, 8), e(1, 2, 4, 8, dtype=torch.float64), e(1, 2, 4, 8), None, 1.0),
         TypeError),
        (lambda: fwd(*(e(1, 2, 4, 8, dtype=torch.int64),) * 3, None, 1.0), TypeError),
        (lambda: fwd(*(e(1, 2, 4, 8),) * 3, e(1, 1, 1, 4), 1.0), ValueError),
        (lambda: fwd(*(e(1, 2, 4, 8),) * 3, e(1, 2, 4, 4, dtype=torch.float64), 1.0), TypeError),
        (lambda: ops.attention_backward(e(1, 2, 4, 8), e(1, 2, 4, 8), e(1, 2, 5, 8), e(1, 2, 4, 8),
                                        e(1, 2, 4, 8), e(1, 2, 4), None, 1.0), ValueError),
        (lambda: ops.attention_backward(e(1, 1, 4, 8), *(e(1, 2, 4, 8),) * 4, e(1, 2, 4), None,
                                        1.0), ValueError),
        (lambda: ops.attention_backward(*(e(1, 2, 4, 8),) * 5, e(1, 2, 4, dtype=torch.float64),
                                        None, 1.0), TypeError),
    ]
    for i, (call, error) in enumerate(bad):
        with pytest.raises(error, match="l2p"):
            call()
            pytest.fail(f"case {i} was not refused")
    out, lse = fwd(e(2, 4, 5, 8), e(2, 2, 7, 8), e(2, 2, 7, 3), e(2, 4, 5, 7), 1.0)
    assert out.shape == (2, 4, 5, 3) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    grads = ops.attention_backward(e(2, 4, 5, 3), e(2, 4, 5, 8), e(2, 2, 7, 8), e(2, 2, 7, 3),
                                   e(2, 4, 5, 3), e(2, 4, 5), None, 1.0)
    assert [g.shape for g in grads] == [(2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 3)]


def test_float64_mask_keeps_float64_precision(device, backend, request):
    # The kernels took the mask in float32 whatever the inputs: a float64 mask (a relative
    # position bias, say) lost its low bits and float64 outputs were off by about 1e-8.
    request.applymarker(pytest.mark.xfail(
        device == "cuda", strict=False,
        reason="the CUDA kernel takes a float32 mask for float64 inputs (not run on a GPU)"))
    q, k, v = _qkv(2, 4, 2, 45, 130, 24, 20, torch.float64, requires_grad=True, device=device)
    bias = torch.randn(1, 4, 45, 130, dtype=torch.float64, device=device)
    bias[torch.rand(bias.shape, device=device) < 0.2] = float("-inf")
    bias[..., 0] = 0.0  # no row masked everywhere, so the reference's gradient is finite
    out = attention(q, k, v, attn_mask=bias, backend=backend)
    want = attention_reference(q, k, v, bias)[0]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
