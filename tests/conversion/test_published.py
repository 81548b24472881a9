"""Each family at its published size, converted on the meta device (no memory): shapes,
token counts and the block split of "first_last:5"."""

from __future__ import annotations

import diffusers
import pytest
import torch

import l2p

from _families import PUBLISHED

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_size_on_meta(name):
    config, size, tokens, n_blocks = PUBLISHED[name]
    with torch.device("meta"):
        source = getattr(diffusers, name).from_config(config)
    model = l2p.convert_to_pixel(source)
    adapter = model.adapter
    p = 32 if name.startswith("Sana") else 16
    assert model.config.patch_size == p
    assert model.pixel_embed.weight.device.type == "meta"
    assert not model.conversion_report.verified
    assert len(model.conversion_report.dropped) == 3

    dim = source.get_submodule(adapter.input_module).weight.shape[0]
    assert model.pixel_embed.weight.shape == (dim, 3, p, p)
    assert model.head.encoder[0].out_channels == 512 // (p // 2)
    assert model.head.fuse.in_channels == 512 + dim
    assert model.head.proj_out.out_channels == 3

    image = torch.empty(1, 3, size, size, device="meta")
    embedded = model.pixel_embed.embed(image)
    assert embedded.shape == (1, tokens, dim)
    assert model.head(image, embedded).shape == (1, 3, size, size)
    # The latent the source forward receives has the latent model's own token grid.
    latent = adapter.dummy_latent(1, size // p, size // p, torch.float32, "meta")
    latent = latent[0].unsqueeze(0) if isinstance(latent, list) else latent
    if latent.dim() == 3:  # packed tokens
        assert latent.shape[1] == tokens
    else:
        vae_factor = 32 if name.startswith("Sana") else 8
        assert latent.shape[-2:] == (size // vae_factor, size // vae_factor)
        assert (size // vae_factor // adapter.latent_patch) ** 2 == tokens

    blocks = [n for n, _ in model.blocks()]
    assert len(blocks) == n_blocks
    report = l2p.set_trainable(model, "first_last:5")
    assert report.trainable_blocks == blocks[:5] + blocks[-5:]
    assert 0 < report.trainable < report.total
    total_source = sum(t.numel() for t in source.parameters())
    assert abs(report.total - total_source) < 0.02 * total_source  # head + embed are small
