"""The toy text encoder's pretraining: a T5 encoder starts close to a bag of words, and the
denoising objective must make its outputs depend on word order."""

from __future__ import annotations

import torch

from l2p.toy import source
from l2p.toy.grammar import generate_scenes
from l2p.toy.text_encoder import SWAPPED_PAIRS, order_blindness, pretrain_text_encoder, shape_positions

SMALL = source.ToySourceConfig().scaled(text_dim=32, text_layers=1)


def _encoder(seed=0):
    pipe = source.build_toy_pipeline(SMALL.scaled(layers=1, heads=2, head_dim=8), seed=seed)
    return pipe.text_encoder, pipe.tokenizer


def test_an_encoder_without_attention_is_order_blind():
    encoder, tokenizer = _encoder()
    with torch.no_grad():
        for block in encoder.encoder.block:
            block.layer[0].SelfAttention.o.weight.zero_()   # every token then sees only itself
    assert abs(order_blindness(encoder, tokenizer) - 1.0) < 1e-6


def test_the_swapped_pairs_hold_the_same_words_and_every_shape_is_compared():
    tokenizer = source.build_toy_tokenizer()
    for a, b in SWAPPED_PAIRS:
        assert sorted(a.split()) == sorted(b.split()) and a != b
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(a).input_ids)
        # Two shapes in each prompt, "cross" and "crosses" among them.
        assert len(shape_positions(pieces)) == 2, a
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("two crosses left of a cross").input_ids)
    assert shape_positions(pieces) == [1, 5]


def test_pretraining_teaches_the_encoder_word_order():
    encoder, tokenizer = _encoder()
    prompts = [s.prompt for s in generate_scenes(600, 0, "train")]
    logs = []
    result = pretrain_text_encoder(encoder, tokenizer, prompts, steps=300, batch=64, lr=3e-3,
                                   corrupt_rate=0.15, max_tokens=24, seed=0, device="cpu",
                                   log=logs.append)
    assert result["steps"] == 300 and logs[-1].startswith("text encoder step 300/300")
    assert result["order_blindness_before"] > 0.99
    assert result["order_blindness_after"] < result["order_blindness_before"] - 0.005
    assert result["reconstruction_word_accuracy"] > 0.9
    # The encoder itself was trained in place (its decoder is thrown away).
    assert abs(order_blindness(encoder, tokenizer) - result["order_blindness_after"]) < 1e-4
