"""patch_embed and unpatchify: opcheck, gradcheck, reference sweeps, bad input."""

from __future__ import annotations

import pytest
import torch

import l2p.ops
from l2p.ops.reference import patch_embed_reference, unpatchify_reference

from _isolated import assert_raises_each

pytestmark = pytest.mark.skipif(not l2p.ops.is_compiled(), reason="l2p._C not built")

# Relative tolerance (error norm / reference norm) against a float64 reference.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _patch_inputs(device, dtype, b, c, h, w, p, d, bias=True, requires_grad=False):
    x = torch.randn(b, c, h, w, device=device, dtype=dtype, requires_grad=requires_grad)
    weight = torch.randn(d, c, p, p, device=device, dtype=dtype, requires_grad=requires_grad)
    bias_t = torch.randn(d, device=device, dtype=dtype, requires_grad=requires_grad) if bias else None
    return x, weight, bias_t


# (B, C, H, W, p, D): odd grids, one-token images, rows longer than one tile (> 64 patches),
# patch 1 and a large patch.
SHAPES = [
    (1, 3, 16, 16, 16, 8),
    (2, 3, 48, 80, 16, 24),
    (3, 4, 6, 10, 2, 5),
    (1, 3, 8, 8 * 67, 8, 16),
    (2, 1, 7, 5, 1, 3),
    (1, 3, 64, 128, 32, 12),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_patch_embed_matches_reference(device, compiled_backend, shape, dtype, with_bias):
    b, c, h, w, p, d = shape
    x, weight, bias = _patch_inputs(device, dtype, b, c, h, w, p, d, bias=with_bias)
    out = l2p.ops.patch_embed(x, weight, bias, patch_size=p, backend=compiled_backend)
    ref = patch_embed_reference(x.double(), weight.double(), None if bias is None else bias.double(), p)
    assert out.dtype == dtype and out.shape == (b, (h // p) * (w // p), d)
    assert rel_err(out, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_unpatchify_matches_reference(device, compiled_backend, shape, dtype, with_bias):
    b, c, h, w, p, d = shape
    n = (h // p) * (w // p)
    tokens = torch.randn(b, n, d, device=device, dtype=dtype)
    weight = torch.randn(c * p * p, d, device=device, dtype=dtype)
    bias = torch.randn(c * p * p, device=device, dtype=dtype) if with_bias else None
    out = l2p.ops.unpatchify(tokens, weight, bias, patch_size=p, height=h, width=w, backend=compiled_backend)
    ref = unpatchify_reference(
        tokens.double(), weight.double(), None if bias is None else bias.double(), p, h, w
    )
    assert out.dtype == dtype and out.shape == (b, c, h, w)
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_unpatchify_is_the_adjoint_layout_of_patch_embed(device, compiled_backend):
    # Feature c*p*p + i*p + j lands on pixel (c, i, j): with weight = the transposed patch
    # embedding of an orthonormal basis, unpatchify inverts patch_embed exactly.
    p, c = 4, 3
    x = torch.randn(2, c, 12, 8, device=device, dtype=torch.float64)
    eye = torch.eye(c * p * p, device=device, dtype=torch.float64)
    tokens = l2p.ops.patch_embed(x, eye.view(-1, c, p, p), patch_size=p, backend=compiled_backend)
    back = l2p.ops.unpatchify(tokens, eye, patch_size=p, height=12, width=8, backend=compiled_backend)
    torch.testing.assert_close(back, x, rtol=0, atol=0)


def test_random_sweep_forward_and_backward(device, compiled_backend):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(12):
        p = int(torch.randint(1, 9, (1,), generator=gen))
        rows, cols = (int(v) for v in torch.randint(1, 6, (2,), generator=gen))
        b, c, d = (int(v) for v in torch.randint(1, 5, (3,), generator=gen))
        x, weight, bias = _patch_inputs(device, torch.float64, b, c, rows * p, cols * p, p, d, requires_grad=True)
        out = l2p.ops.patch_embed(x, weight, bias, patch_size=p, backend=compiled_backend)
        ref = patch_embed_reference(x, weight, bias, p)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, weight, bias), grad)
        want = torch.autograd.grad(ref, (x, weight, bias), grad)
        torch.testing.assert_close(out, ref)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)


def test_patch_embed_gradcheck(device, compiled_backend):
    x, weight, bias = _patch_inputs(device, torch.float64, 2, 2, 6, 9, 3, 4, requires_grad=True)
    fn = lambda x, w, b: l2p.ops.patch_embed(x, w, b, patch_size=3, backend=compiled_backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_unpatchify_gradcheck(device, compiled_backend):
    tokens = torch.randn(2, 6, 5, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * 9, 5, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * 9, device=device, dtype=torch.float64, requires_grad=True)
    fn = lambda t, w, b: l2p.ops.unpatchify(t, w, b, patch_size=3, height=6, width=9, backend=compiled_backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tokens, weight, bias))


# Which inputs require a gradient: the autograd computes only those, and a missing bias shifts
# no other input's gradient.
GRAD_SUBSETS = [(True, False, False), (False, True, False), (False, False, True), (True, True, None),
                (False, True, None)]


@pytest.mark.parametrize("wants", GRAD_SUBSETS)
def test_patch_embed_gradients_of_some_inputs(device, compiled_backend, wants):
    x, weight, bias = _patch_inputs(device, torch.float64, 2, 2, 6, 9, 3, 4, bias=wants[2] is not None)
    inputs = [t.requires_grad_(w) if t is not None else None for t, w in zip((x, weight, bias), wants)]
    out = l2p.ops.patch_embed(*inputs, patch_size=3, backend=compiled_backend)
    ref = patch_embed_reference(*inputs, 3)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(ref, wanted, grad)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("wants", GRAD_SUBSETS)
def test_unpatchify_gradients_of_some_inputs(device, compiled_backend, wants):
    tokens = torch.randn(2, 6, 5, device=device, dtype=torch.float64)
    weight = torch.randn(2 * 9, 5, device=device, dtype=torch.float64)
    bias = torch.randn(2 * 9, device=device, dtype=torch.float64) if wants[2] is not None else None
    inputs = [t.requires_grad_(w) if t is not None else None for t, w in zip((tokens, weight, bias), wants)]
    out = l2p.ops.unpatchify(*inputs, patch_size=3, height=6, width=9, backend=compiled_backend)
    ref = unpatchify_reference(*inputs, 3, 6, 9)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(ref, wanted, grad)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_patch_embed(device, with_bias):
    x, weight, bias = _patch_inputs(device, torch.float32, 2, 3, 8, 12, 4, 6, bias=with_bias, requires_grad=True)
    torch.library.opcheck(torch.ops.l2p.patch_embed.default, (x, weight, bias, 4))


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_unpatchify(device, with_bias):
    tokens = torch.randn(2, 6, 5, device=device, requires_grad=True)
    weight = torch.randn(3 * 16, 5, device=device, requires_grad=True)
    bias = torch.randn(3 * 16, device=device, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.l2p.unpatchify.default, (tokens, weight, bias, 4, 8, 12))


def test_opcheck_patch_weight_grad(device):
    x = torch.randn(2, 3, 8, 12, device=device)
    grad_tokens = torch.randn(2, 6, 5, device=device)
    torch.library.opcheck(torch.ops.l2p.patch_weight_grad.default, (x, grad_tokens, 4))


def test_non_contiguous_inputs(device, compiled_backend):
    x = torch.randn(2, 16, 12, 3, device=device).permute(0, 3, 2, 1)  # (2, 3, 12, 16), strided
    weight = torch.randn(5, 4, 4, 3, device=device).permute(0, 3, 1, 2)
    assert not x.is_contiguous() and not weight.is_contiguous()
    out = l2p.ops.patch_embed(x, weight, patch_size=4, backend=compiled_backend)
    torch.testing.assert_close(out, patch_embed_reference(x, weight, None, 4))
    tokens = torch.randn(2, 5, 12, device=device).transpose(1, 2)  # (2, 12, 5)
    w2 = torch.randn(5, 48, device=device).t()
    img = l2p.ops.unpatchify(tokens, w2, patch_size=4, height=12, width=16, backend=compiled_backend)
    torch.testing.assert_close(img, unpatchify_reference(tokens, w2, None, 4, 12, 16))


def test_torch_backend_and_auto_agree(device):
    x, weight, bias = _patch_inputs(device, torch.float32, 1, 3, 32, 32, 16, 8)
    auto = l2p.ops.patch_embed(x, weight, bias, patch_size=16)
    torch_way = l2p.ops.patch_embed(x, weight, bias, patch_size=16, backend="torch")
    torch.testing.assert_close(auto, torch_way)


def test_compiles_under_torch_compile():
    x, weight, bias = _patch_inputs("cpu", torch.float32, 1, 3, 16, 32, 8, 4)
    fn = torch.compile(lambda x: l2p.ops.patch_embed(x, weight, bias, patch_size=8, backend="cpp"), fullgraph=True)
    torch.testing.assert_close(fn(x), patch_embed_reference(x, weight, bias, 8))


def test_patch_embed_matches_a_diffusers_patch_embed():
    from diffusers.models.embeddings import PatchEmbed

    embed = PatchEmbed(height=32, width=32, patch_size=16, in_channels=3, embed_dim=24, pos_embed_type=None)
    x = torch.randn(2, 3, 32, 32)
    ours = l2p.ops.patch_embed(x, embed.proj.weight, embed.proj.bias, patch_size=16, backend="cpp")
    torch.testing.assert_close(ours, embed(x), rtol=1e-5, atol=1e-5)


# Bad input: each case names what is wrong.
def _good_patch_args():
    return torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda x, w, b: (x[0], w, b), ValueError, r"\(B, C, H, W\)"),
        (lambda x, w, b: (x[..., :30], w, b), ValueError, "not a multiple of patch_size 16"),
        (lambda x, w, b: (x.double(), w, b), TypeError, "dtype"),
        (lambda x, w, b: (x, w[:, :2], b), ValueError, r"weight must be \(D, 3, 16, 16\)"),
        (lambda x, w, b: (x, w, b[:3]), ValueError, r"bias must be \(8,\)"),
        (lambda x, w, b: (x[:0], w, b), ValueError, "empty"),
        (lambda x, w, b: (x.int(), w, b), TypeError, "floating-point"),
    ],
)
def test_patch_embed_bad_input(mutate, error, match):
    x, w, b = mutate(*_good_patch_args())
    with pytest.raises(error, match=match):
        l2p.ops.patch_embed(x, w, b, patch_size=16)


def test_patch_embed_bad_patch_size_and_backend():
    x, w, b = _good_patch_args()
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        l2p.ops.patch_embed(x, w, b, patch_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        l2p.ops.patch_embed(x, w, b, patch_size=16, backend="fast")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        l2p.ops.patch_embed(x, w, b, patch_size=16, backend="cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=30, width=32), "not a multiple of patch_size 16"),
        (dict(height=64, width=32), "tokens cannot fill a 64x32 image"),
        (dict(height=-16, width=32), "height must be a positive int"),
    ],
)
def test_unpatchify_bad_input(kwargs, match):
    tokens, weight = torch.randn(1, 4, 8), torch.randn(3 * 256, 8)
    with pytest.raises(ValueError, match=match):
        l2p.ops.unpatchify(tokens, weight, patch_size=16, **kwargs)


def test_unpatchify_bad_weight():
    tokens = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="input features"):
        l2p.ops.unpatchify(tokens, torch.randn(768, 7), patch_size=16, height=32, width=32)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        l2p.ops.unpatchify(tokens, torch.randn(700, 8), patch_size=16, height=32, width=32)


def test_direct_op_call_checks_instead_of_crashing(device):
    # torch.ops bypasses the Python checks; the C++ kernels must still refuse cleanly.
    assert_raises_each(device, [
        ("torch.ops.l2p.patch_embed(torch.randn(1, 3, 30, 32, device=device), "
         "torch.randn(8, 3, 16, 16, device=device), None, 16)", ValueError, "not a multiple"),
        ("torch.ops.l2p.unpatchify(torch.randn(1, 3, 8, device=device), "
         "torch.randn(768, 8, device=device), None, 16, 32, 32)", ValueError, "tokens cannot fill"),
        ("torch.ops.l2p.patch_embed(torch.randn(1, 3, 32, 32, device=device), "
         "torch.randn(8, 3, 16, 16, device=device).double(), None, 16)", TypeError, "dtype"),
    ])

def test_direct_op_call_refuses_a_patch_size_whose_square_overflows(device):
    # p = 2^32: p*p wraps to 0 in int64, and the check that followed divided by it (SIGFPE).
    big = 2**32
    assert_raises_each(device, [
        (f"torch.ops.l2p.unpatchify(torch.ones(1, 1, 1, device=device), "
         f"torch.ones(1, 1, device=device), None, {big}, {big}, {big})", ValueError, "too large"),
        (f"torch.ops.l2p.patch_embed(torch.ones(1, 1, 0, 0, device=device), "
         f"torch.ones(1, 1, 2, 2, device=device), None, {big})",
         ValueError, "too large"),
        (f"torch.ops.l2p.patch_weight_grad(torch.ones(1, 1, 0, 0, device=device), "
         f"torch.ones(1, 0, 1, device=device), {big})", ValueError, "too large"),
    ])


@pytest.mark.parametrize("op", ["patch_embed", "unpatchify"])
def test_second_derivatives_are_refused_on_the_compiled_path(device, compiled_backend, op):
    # The compiled backward calls kernels without autograd, so a graph of the gradient would
    # give wrong second derivatives; the torch path gives right ones.
    if op == "patch_embed":
        args = _patch_inputs(device, torch.float64, 1, 2, 4, 4, 2, 3, requires_grad=True)
        fn = lambda backend: l2p.ops.patch_embed(*args, patch_size=2, backend=backend)  # noqa: E731
    else:
        args = (torch.randn(1, 4, 3, device=device, dtype=torch.float64, requires_grad=True),
                torch.randn(8, 3, device=device, dtype=torch.float64, requires_grad=True))
        fn = lambda backend: l2p.ops.unpatchify(*args, patch_size=2, height=4, width=4, backend=backend)  # noqa: E731
    with pytest.raises(RuntimeError, match="second derivatives .* backend='torch'"):
        torch.autograd.grad(fn(compiled_backend).square().sum(), args, create_graph=True)
    grads = torch.autograd.grad(fn("torch").square().sum(), args, create_graph=True)
    assert all(g.requires_grad for g in grads)
    # Without create_graph the compiled backward still runs.
    for g, r in zip(torch.autograd.grad(fn(compiled_backend).square().sum(), args), grads):
        torch.testing.assert_close(g, r.detach())


def test_fake_kernels_refuse_what_the_kernels_refuse():
    # Meta tensors run the fake kernels: they used to trace a shape ([1, 1, 5] for p=3 on a
    # 4x4 image) for calls the real kernels refuse.
    meta = dict(device="meta")
    ops = torch.ops.l2p
    bad = [
        lambda: ops.patch_embed(torch.empty(1, 1, 4, 4, **meta), torch.empty(5, 1, 3, 3, **meta), None, 3),
        lambda: ops.patch_embed(torch.empty(1, 1, 4, 4, **meta), torch.empty(5, 2, 2, 2, **meta), None, 2),
        lambda: ops.patch_embed(torch.empty(1, 1, 4, 4, **meta), torch.empty(5, 1, 2, 2, **meta),
                                torch.empty(4, **meta), 2),
        lambda: ops.patch_embed(torch.empty(1, 1, 4, 4, **meta), torch.empty(5, 1, 2, 2, **meta), None, 0),
        lambda: ops.patch_weight_grad(torch.empty(1, 1, 4, 4, **meta), torch.empty(1, 3, 5, **meta), 2),
        lambda: ops.unpatchify(torch.empty(1, 4, 3, **meta), torch.empty(9, 3, **meta), None, 2, 4, 4),
        lambda: ops.unpatchify(torch.empty(1, 4, 3, **meta), torch.empty(8, 3, **meta), None, 3, 4, 4),
        lambda: ops.unpatchify(torch.empty(1, 5, 3, **meta), torch.empty(8, 3, **meta), None, 2, 4, 4),
        lambda: ops.unpatchify(torch.empty(1, 4, 3, **meta), torch.empty(8, 2, **meta), None, 2, 4, 4),
        lambda: ops.unpatchify(torch.empty(1, 1, 1, **meta), torch.empty(1, 1, **meta), None, 2**32, 2**32, 2**32),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError, match="l2p"):
            call()
            pytest.fail(f"case {i} was not refused")
    assert ops.patch_embed(torch.empty(2, 1, 4, 6, **meta), torch.empty(5, 1, 2, 2, **meta),
                           torch.empty(5, **meta), 2).shape == (2, 6, 5)
    assert ops.unpatchify(torch.empty(2, 6, 3, **meta), torch.empty(8, 3, **meta), None, 2, 4, 6).shape == (2, 2, 4, 6)
    assert ops.patch_weight_grad(torch.empty(2, 1, 4, 6, **meta), torch.empty(2, 6, 5, **meta), 2).shape == (5, 1, 2, 2)


def test_fronts_take_numpy_integers_and_refuse_bad_biases():
    import numpy as np

    x, weight, bias = _good_patch_args()
    out = l2p.ops.patch_embed(x, weight, bias, patch_size=np.int64(16))
    torch.testing.assert_close(out, patch_embed_reference(x, weight, bias, 16))
    tokens, w_u = torch.randn(1, 4, 8), torch.randn(3 * 256, 8)
    img = l2p.ops.unpatchify(tokens, w_u, patch_size=np.int32(16), height=np.int64(32), width=32)
    torch.testing.assert_close(img, unpatchify_reference(tokens, w_u, None, 16, 32, 32))
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        l2p.ops.patch_embed(x, weight, bias, patch_size=True)
    for not_a_tensor in (bias.tolist(), bias.numpy()):
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            l2p.ops.patch_embed(x, weight, not_a_tensor, patch_size=16)
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            l2p.ops.unpatchify(tokens, w_u, not_a_tensor, patch_size=16, height=32, width=32)
