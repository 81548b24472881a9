"""PixelPatchEmbed, DetailerHead and LinearHead on their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2p.models import DetailerHead, LinearHead, PixelPatchEmbed, default_detailer_channels
from l2p.ops.reference import unpatchify_reference


def test_pixel_patch_embed_is_a_strided_conv():
    embed = PixelPatchEmbed(16, 24)
    assert embed.weight.shape == (24, 3, 16, 16)
    x = torch.randn(2, 3, 32, 48)
    ref = F.conv2d(x, embed.weight, embed.bias, stride=16).flatten(2).transpose(1, 2)
    out = embed(x)
    assert out.shape == (2, 6, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pixel_patch_embed_rejects_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of patch_size 16"):
        PixelPatchEmbed(16, 8)(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize("patch, expected", [
    (16, [64, 128, 256, 512]),
    (32, [32, 64, 128, 256, 512]),
    (64, [16, 32, 64, 128, 256, 512]),
])
def test_default_detailer_widths_follow_the_paper(patch, expected):
    assert default_detailer_channels(patch) == expected
    head = DetailerHead(patch, token_dim=8)
    assert [c.out_channels for c in head.encoder] == expected
    # Decoder mirrors the encoder: 512 -> 256 -> 128 -> 64 -> 64 at P=16.
    assert [c.out_channels for c in head.decoder] == expected[-2::-1] + [expected[0]]
    assert head.fuse.in_channels == expected[-1] + 8 and head.fuse.kernel_size == (1, 1)


def test_detailer_head_size_at_p16():
    # ~7M at Z-Image's width (the bottleneck fusion grows with D), of which ~4.7M do not
    # depend on D.
    head = DetailerHead(16, token_dim=3840)
    n = sum(p.numel() for p in head.parameters())
    assert 6.5e6 < n < 7.5e6


def test_detailer_head_shapes_and_gradients():
    head = DetailerHead(16, token_dim=12, channels=[4, 8, 8, 16])
    image = torch.randn(2, 3, 32, 48, requires_grad=True)
    tokens = torch.randn(2, 6, 12, requires_grad=True)
    out = head(image, tokens)
    assert out.shape == (2, 3, 32, 48)
    out.square().sum().backward()
    assert image.grad.abs().sum() > 0 and tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_detailer_head_token_layout_is_row_major():
    # A token feature must land at its own grid cell of the bottleneck.
    head = DetailerHead(2, token_dim=1, channels=[1])
    seen = {}
    head.fuse.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    tokens = torch.arange(6.0).reshape(1, 6, 1)
    head(torch.zeros(1, 3, 4, 6), tokens)
    assert torch.equal(seen["x"][0, 1], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("patch, channels, match", [
    (12, None, "power-of-two"),
    (16, [8, 16], "4 positive widths"),
])
def test_detailer_head_bad_config(patch, channels, match):
    with pytest.raises(ValueError, match=match):
        DetailerHead(patch, 8, channels=channels)


def test_linear_head_matches_reference():
    head = LinearHead(16, token_dim=10)
    tokens = torch.randn(2, 6, 10)
    out = head(torch.zeros(2, 3, 32, 48), tokens)
    ref = unpatchify_reference(tokens, head.weight, head.bias, 16, 32, 48)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_head_config_by_bottleneck_width_follows_the_patch_size():
    from l2p.models.heads import complete_head_config

    assert complete_head_config({"type": "detailer", "max_channels": 128}, 8) == \
        {"type": "detailer", "channels": [32, 64, 128]}
    assert complete_head_config({"type": "detailer", "max_channels": 128}, 4)["channels"] == [64, 128]
    assert default_detailer_channels(16, 32) == [8, 8, 16, 32]   # never narrower than 8
    with pytest.raises(ValueError, match="not both"):
        complete_head_config({"type": "detailer", "channels": [8, 8], "max_channels": 8}, 4)


@pytest.mark.parametrize("head, match", [
    ({"type": "detailer", "max_channels": 0}, "max_channels must be a positive int, got 0"),
    ({"type": "detailer", "max_channels": -8}, "max_channels must be a positive int, got -8"),
    ({"type": "detailer", "max_channels": "512"}, "max_channels must be a positive int"),
    ({"type": "detailer", "channels": [8, 16.5]}, "channels entry must be a positive int, got 16.5"),
    ({"type": "detailer", "channels": [8, 0]}, "channels entry must be a positive int, got 0"),
    ({"type": "detailer", "channels": []}, "channels must be a list of positive ints"),
    ({"type": "detailer", "channels": "8,16"}, "channels must be a list of positive ints"),
    (None, "head must be one of"),
    (16, "head must be one of"),
])
def test_head_config_mistakes_are_refused_not_replaced(head, match):
    # A zero width used to give the default 512-wide head, a negative one the narrowest, and a
    # fractional width was truncated, all silently.
    from l2p.models.heads import complete_head_config

    with pytest.raises(ValueError, match=match):
        complete_head_config(head, 4)


@pytest.mark.parametrize("image_shape, tokens_shape, match", [
    ((1, 3, 16, 16), (1, 10, 12), r"got tokens \(1, 10, 12\)"),  # another grid's token count
    ((2, 3, 16, 16), (1, 16, 12), r"here \(2, 16, 12\)"),  # one sample's tokens for two images
    ((1, 3, 16, 16), (1, 16, 10), r"token_dim 12"),
    ((1, 3, 18, 16), (1, 16, 12), "not a multiple of patch_size 4; resize or pad it to 20x16"),
    ((1, 4, 16, 16), (1, 16, 12), r"image \(B, 3, H, W\)"),
    ((3, 16, 16), (1, 16, 12), r"image must be \(B, C, H, W\)"),
])
@pytest.mark.parametrize("tiled", [False, True])
def test_detailer_head_inputs_that_do_not_fit_are_named(image_shape, tokens_shape, match, tiled):
    # These failed inside torch (a reshape, the decoder's concatenation, a conv), in terms of
    # the head's internals.
    head = DetailerHead(4, 12, [8, 16])
    if tiled:
        head.enable_tiling(4)
    with pytest.raises(ValueError, match=match):
        head(torch.randn(*image_shape), torch.randn(*tokens_shape))


@pytest.mark.parametrize("build", [
    lambda: PixelPatchEmbed(0, 8), lambda: PixelPatchEmbed(4, 0), lambda: DetailerHead(4.0, 8),
    lambda: DetailerHead("4", 8), lambda: DetailerHead(4, 0), lambda: LinearHead(0, 8),
])
def test_module_sizes_must_be_positive_ints(build):
    # PixelPatchEmbed(0, 8) divided by zero; DetailerHead(4.0, 8) compared floats bitwise.
    with pytest.raises(ValueError, match="must be a positive int"):
        build()
