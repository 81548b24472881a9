"""PixArt-alpha 1024-style sources (sample_size 128: the transformer's adaLN also embeds the
image resolution and aspect ratio) convert, sample and train with the conditions their own
pipeline passes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def alpha_source(tmp_path_factory):
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    from l2p.testing import build_tiny_pixart_sigma_pipeline

    sigma = build_tiny_pixart_sigma_pipeline(seed=0)
    # use_additional_conditions unset: diffusers turns it on for sample_size 128, as in
    # PixArt-XL-2-1024-MS. The size embeddings are a third of the width each, so 48 wide.
    transformer = PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=48, caption_channels=32, sample_size=128, patch_size=2, norm_num_groups=32,
    ).eval()
    assert transformer.use_additional_conditions
    pipe = PixArtAlphaPipeline(tokenizer=sigma.tokenizer, text_encoder=sigma.text_encoder, vae=sigma.vae,
                               transformer=transformer, scheduler=sigma.scheduler)
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("pixart_alpha") / "source"
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe, path


def _added_cond(transformer, run):
    seen = []
    hook = transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_samples_with_the_source_pipelines_size_conditions(alpha_source, tmp_path):
    from l2p import L2PPipeline
    from l2p.conversion import convert_folder

    source, path = alpha_source
    convert_folder(path, tmp_path / "pixel", head={"type": "detailer", "channels": [8, 16]}, seed=1)
    pipe = L2PPipeline.from_pretrained(tmp_path / "pixel")
    pipe.set_progress_bar_config(disable=True)
    ours = _added_cond(pipe.transformer, lambda: pipe(
        ["a cat", "a dog"], height=16, width=24, num_inference_steps=2, guidance_scale=1.0, output_type="pt"))
    theirs = _added_cond(source.transformer, lambda: source(
        ["a cat", "a dog"], height=16, width=24, num_inference_steps=2, guidance_scale=1.0,
        use_resolution_binning=False, output_type="pt"))
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        for key in ("resolution", "aspect_ratio"):
            assert a[key] is not None and a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=0)
    assert ours[0]["resolution"].tolist() == [[16.0, 24.0]] * 2


def test_trains_a_step(alpha_source, tmp_path):
    from _trainkit import make_config, make_images

    from l2p.train.loop import Trainer

    _, path = alpha_source
    images = make_images(tmp_path / "images", n=2)
    trainer = Trainer(make_config(path, images, tmp_path / "run", train__max_steps=1, checkpoint__every=100))
    loss, _, finite = trainer.train_step()
    assert finite and loss > 0
    # The run's delta carries the fingerprint of its frozen tensors, which are those of the
    # source as l2p convert writes it: it merges onto that base.
    from l2p.conversion import convert_folder, merge_folder

    final = trainer.export()
    convert_folder(path, tmp_path / "base", head=trainer._head_config(), seed=trainer.cfg.model.init_seed)
    merge_folder(tmp_path / "base", final / "delta.safetensors", tmp_path / "merged")


def test_the_source_transformer_takes_the_same_call(alpha_source):
    # The adapter is also handed the source transformer itself (tests/adapters): its config
    # is the source config. (Given a latent, the resolution is the latent's size, not the
    # image's: only the pixel model's call, x_t an image, gives the pipeline's values.)
    from l2p.adapters.pixart import PixArtAdapter

    source, _ = alpha_source
    cond = {"prompt_embeds": torch.randn(2, 5, 32), "prompt_attention_mask": torch.ones(2, 5, dtype=torch.long)}
    kwargs = PixArtAdapter.transformer_kwargs(cond, torch.randn(2, 4, 8, 12), torch.tensor([500, 20]),
                                              source.transformer, 1.0)
    assert kwargs["added_cond_kwargs"]["resolution"].shape == (2, 2)
    assert source.transformer(**kwargs, return_dict=False)[0].shape == (2, 8, 8, 12)
