"""Dropping the caption padding that PixArt and Sana mask out changes no output, only the work."""

import pytest
import torch

from l2p.adapters import ADAPTERS
from l2p.adapters.base import without_text_padding
from l2p.testing import build_tiny_pixart_sigma_pipeline, build_tiny_sana_pipeline


def test_drops_only_the_positions_no_caption_keeps():
    embeds = torch.randn(3, 10, 4)
    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[0, :2] = 1
    mask[1, :5] = 1
    mask[2, [0, 3]] = 1  # not a prefix: the gap inside stays
    trimmed, trimmed_mask = without_text_padding(embeds, mask)
    assert trimmed.shape == (3, 5, 4) and trimmed_mask.shape == (3, 5)
    torch.testing.assert_close(trimmed, embeds[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(trimmed_mask, mask[:, :5], rtol=0, atol=0)


def test_leaves_a_batch_alone_when_a_caption_keeps_nothing():
    embeds, mask = torch.randn(2, 6, 4), torch.zeros(2, 6)
    mask[0, :3] = 1  # row 1 keeps nothing: its attention is uniform over all 6 positions
    out, out_mask = without_text_padding(embeds, mask)
    assert out is embeds and out_mask is mask


@pytest.mark.parametrize("build", [build_tiny_pixart_sigma_pipeline, build_tiny_sana_pipeline],
                         ids=["pixart", "sana"])
def test_the_transformer_output_is_unchanged(build):
    pipe = build()
    adapter = ADAPTERS[type(pipe.transformer).__name__]
    cond = adapter.encode_prompts(pipe, ["a red circle", "two blue squares left of a green cross"], "cpu")
    full_length = cond["prompt_embeds"].shape[1]
    config = pipe.transformer.config
    size = config.sample_size
    x_t = torch.randn(2, config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    times = torch.tensor([500.0, 20.0])
    kwargs = adapter.transformer_kwargs(cond, x_t, times, pipe.transformer, 1.0)
    assert kwargs["encoder_hidden_states"].shape[1] < full_length  # the captions were padded
    with torch.no_grad():
        trimmed = pipe.transformer(**kwargs, return_dict=False)[0]
        padded = pipe.transformer(**{**kwargs, "encoder_hidden_states": cond["prompt_embeds"],
                                     "encoder_attention_mask": cond["prompt_attention_mask"]},
                                  return_dict=False)[0]
    torch.testing.assert_close(trimmed, padded, rtol=1e-5, atol=1e-5)
