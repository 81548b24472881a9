"""The tiled Detailer Head equals the untiled one; its halo is the derived 2P; its memory is
bounded by the tile."""

from __future__ import annotations

import pytest
import torch

from l2p.models import DetailerHead
from l2p.sample import tiling

# (patch size, channels, (H, W) in patches, tile in patches): tiles that divide the image and
# tiles that do not, single-patch tiles, non-square images.
CASES = [
    (4, [8, 16], (8, 6), 3),
    (4, [8, 16], (5, 7), 2),
    (4, [8, 16], (4, 4), 1),
    (16, [4, 8, 8, 16], (5, 3), 2),
    (16, [4, 8, 8, 16], (4, 6), 4),
    (64, [4, 4, 4, 8, 8, 16], (3, 2), 1),
]


def _inputs(p, rows, cols, dim=12, batch=2):
    gen = torch.Generator().manual_seed(p + rows)
    image = torch.randn(batch, 3, rows * p, cols * p, generator=gen)
    tokens = torch.randn(batch, rows * cols, dim, generator=gen)
    return image, tokens


@pytest.mark.parametrize("p,channels,grid,tile", CASES)
def test_tiled_equals_untiled(p, channels, grid, tile):
    head = DetailerHead(p, 12, channels).eval()
    image, tokens = _inputs(p, *grid)
    with torch.no_grad():
        full = head(image, tokens)
        head.enable_tiling(tile * p)
        tiled = head(image, tokens)
    assert tiled.shape == full.shape and tiled.dtype == torch.float32
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("p", [2, 4, 16, 64])
def test_halo_is_two_patches(p):
    head = DetailerHead(p, 8, [4] * (p.bit_length() - 1))
    assert tiling.head_halo(head) == 2 * p


def test_halo_of_something_that_is_not_a_detailer_head():
    # A LinearHead or None failed with "object has no attribute 'encoder' / 'patch_size'".
    from l2p.models import LinearHead

    with pytest.raises(TypeError, match="head_halo takes a DetailerHead .*, got NoneType"):
        tiling.head_halo(None)
    with pytest.raises(TypeError, match="got LinearHead; a LinearHead is per-token and needs no halo"):
        tiling.head_halo(LinearHead(4, 8))


@pytest.mark.parametrize("p,channels,grid,tile", [CASES[1], (16, [4, 8, 8, 16], (7, 5), 2), CASES[5]])
def test_published_layout_tiled_equals_untiled_with_a_three_patch_halo(p, channels, grid, tile, monkeypatch):
    # Max pooling and a 3x3 conv after each upsampling (the published L2P decoder): halo 3P,
    # derived from the modules; one patch less is not exact.
    head = DetailerHead(p, 12, channels, pool="max", up_convs=True).double().eval()
    assert tiling.head_halo(head) == 3 * p
    image, tokens = (t.double() for t in _inputs(p, *grid))
    with torch.no_grad():
        full = head(image, tokens)
        head.enable_tiling(tile * p)
        torch.testing.assert_close(head(image, tokens), full, rtol=0, atol=1e-10)
        if max(grid) > tile + 4:  # else a 2P halo already reaches across the whole image
            monkeypatch.setattr(tiling, "head_halo", lambda h: 2 * p)
            assert (head(image, tokens) - full).abs().max() > 1e-9


def test_smaller_halo_is_not_exact(monkeypatch):
    """The derivation is tight to the grid: one patch less of halo changes the output."""
    p = 16
    head = DetailerHead(p, 12, [4, 8, 8, 16]).double()
    image, tokens = (t.double() for t in _inputs(p, 4, 4))
    full = head(image, tokens)
    monkeypatch.setattr(tiling, "head_halo", lambda h: 2 * p - p)
    head.enable_tiling(2 * p)
    assert (head(image, tokens) - full).abs().max() > 1e-9


def test_activations_bounded_by_tile():
    p, tile = 4, 8
    head = DetailerHead(p, 12, [8, 16]).eval()
    image, tokens = _inputs(p, 16, 12)
    seen = []
    head.encoder[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    head.enable_tiling(tile)
    with torch.no_grad():
        head(image, tokens)
    bound = tile + 2 * tiling.head_halo(head)
    assert len(seen) == (64 // tile) * (48 // tile)
    assert max(max(s) for s in seen) <= bound


def test_auto_tile_size_from_memory():
    p = 4
    head = DetailerHead(p, 12, [8, 16]).eval()
    budget = int(tiling.head_bytes_per_pixel(head) * (6 * p + 2 * tiling.head_halo(head)) ** 2)
    assert tiling.auto_tile_size(head, "cpu", torch.float32, budget=budget) == 6 * p
    assert tiling.auto_tile_size(head, "cpu", torch.float32, budget=1) == p
    assert tiling.auto_tile_size(head, "cpu", torch.float32) >= p  # the free memory
    image, tokens = _inputs(p, 9, 5)
    with torch.no_grad():
        full = head(image, tokens)
        head.enable_tiling()  # sized from the free memory: one tile here
        torch.testing.assert_close(head(image, tokens), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 6, -4, 2.0, True])
def test_bad_tile_size(bad):
    head = DetailerHead(4, 12, [8, 16])
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        head.enable_tiling(bad)


def test_model_head_tiling_keeps_the_output():
    """PixelTransformer2DModel.enable_head_tiling: the whole model's output is unchanged."""
    import diffusers

    import _families as fam
    from l2p import convert_to_pixel

    name = "SD3Transformer2DModel"
    torch.manual_seed(0)
    model = convert_to_pixel(getattr(diffusers, name)(**fam.TINY[name]).eval(),
                             head={"type": "detailer", "channels": [4, 4, 8, 8]})
    h, w = 3 * 16, 5 * 16
    kwargs = fam.call_kwargs(name, 1, h, w, torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        full = model(x, **kwargs).sample
        model.enable_head_tiling(32)
        tiled = model(x, **kwargs).sample
        model.disable_head_tiling()
        again = model(x, **kwargs).sample
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, full, rtol=0, atol=0)
