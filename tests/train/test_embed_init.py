"""model.embed_init=vae: the trainer starts the pixel embedding from the source's VAE encoder
and latent projection, fitted on the corpus; off by default, refused for from-scratch runs."""

from __future__ import annotations

import pytest
import torch

from _trainkit import make_config
from l2p.conversion.embedding_init import fit_pixel_embedding
from l2p.train.config import ConfigError, load_config
from l2p.train.loop import Trainer
from l2p.train.source import encode_latents


def test_config_checks_name_the_fix():
    assert load_config(None, []).model.embed_init == "random"
    with pytest.raises(ConfigError, match="model.embed_init must be one of random, vae"):
        load_config(None, ["model.embed_init=linear"])
    with pytest.raises(ConfigError, match="from-scratch run"):
        load_config(None, ["model.embed_init=vae", "model.init=random", "model.trainable=all"])
    with pytest.raises(ConfigError, match="embed_init_images must be >= 1"):
        load_config(None, ["model.embed_init=vae", "model.embed_init_images=0"])
    with pytest.raises(ConfigError, match="embed_init_ridge must be >= 0"):
        load_config(None, ["model.embed_init=vae", "model.embed_init_ridge=-1"])


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_trainer_fits_the_embedding_on_the_corpus(family, sources, images, tmp_path, capsys):
    fresh = Trainer(make_config(sources[family], images, tmp_path / "random"))
    fitted = Trainer(make_config(sources[family], images, tmp_path / "vae", model__embed_init="vae",
                                 model__embed_init_images=5))
    assert "pixel embedding fitted to the source's VAE" in capsys.readouterr().out
    embed = fitted.model.pixel_embed
    assert not torch.equal(embed.weight, fresh.model.pixel_embed.weight)
    # The same as fitting by hand on the corpus's first five images.
    source = fitted.source.load_transformer(torch.float32)
    vae = fitted.source.load_vae_encoder(torch.float32)
    first = torch.stack([fitted.dataset[i]["pixel_values"] for i in range(5)])
    expected = fresh.model
    fit = fit_pixel_embedding(expected, source, lambda x: encode_latents(vae, x), [first], ridge=0.1)
    assert fit.patches == 5 * (32 // expected.config.patch_size) ** 2
    torch.testing.assert_close(embed.weight, expected.pixel_embed.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embed.bias, expected.pixel_embed.bias, rtol=1e-5, atol=1e-6)
    # Only the embedding changed: every other tensor is the conversion's.
    for name, tensor in fitted.model.named_parameters():
        if not name.startswith("transformer." + fitted.model.adapter.input_module):
            assert torch.equal(tensor, dict(fresh.model.named_parameters())[name]), name


def test_a_frozen_fitted_embedding_is_refused(sources, images, tmp_path):
    """A policy that freezes the pixel embedding would keep the fitted one out of the deltas
    (and out of the FSDP export, which merges them onto a fresh conversion, leaving its random
    embedding): refused before anything is fitted, naming the tensors."""
    cfg = make_config(sources["pixart"], images, tmp_path / "run", model__embed_init="vae",
                      model__trainable="head.*")
    with pytest.raises(ConfigError, match=r"transformer\.pos_embed\.proj\.weight.*pos_embed\.proj\.\*"):
        Trainer(cfg)
    # Trained with the head, the fitted embedding is fine.
    Trainer(make_config(sources["pixart"], images, tmp_path / "ok", model__embed_init="vae",
                        model__embed_init_images=2, model__trainable="head.*,transformer.pos_embed.*"))
