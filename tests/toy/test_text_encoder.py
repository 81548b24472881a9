"""The toy text encoder's pretraining: a T5 encoder starts close to a bag of words, and each
pretraining objective must make its outputs depend on word order."""

from __future__ import annotations

import pytest
import torch

from l2p.toy import source
from l2p.toy.grammar import generate_scenes
from l2p.toy.text_encoder import (SWAPPED_PAIRS, _context_targets, _ContextTask, order_blindness, pretrain_text_encoder,
                                  shape_positions, tokenize_prompts)

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
    assert result["steps"] == 300 and logs[-1].startswith("text encoder step 300/300 denoise")
    assert result["order_blindness_before"] > 0.99
    assert result["order_blindness_after"] < result["order_blindness_before"] - 0.005
    assert result["objective"] == "denoise" and result["word_accuracy"] > 0.9
    # The encoder itself was trained in place (its decoder is thrown away).
    assert abs(order_blindness(encoder, tokenizer) - result["order_blindness_after"]) < 1e-4


def test_context_targets_are_the_neighbouring_words_inside_the_prompt():
    tokenizer = source.build_toy_tokenizer()
    ids, mask = tokenize_prompts(tokenizer, ["a red circle", "two blue squares above a cross"], 8)
    targets = _context_targets(ids, mask, [-2, -1, 1, 2])
    assert targets.shape == (2, 8, 4)
    length = int(mask[0].sum())                       # "a red circle" and the end token
    for i in range(8):
        for k, offset in enumerate((-2, -1, 1, 2)):
            j = i + offset
            inside = 0 <= j < length and i < length
            assert targets[0, i, k].item() == (ids[0, j].item() if inside else -100)
    # Padding neither predicts nor is predicted.
    assert (targets[0, length:] == -100).all() and (targets[0, :, 2:][length - 1] == -100).all()


@pytest.mark.parametrize("objective", ["context", "preceding"])
def test_context_pretraining_puts_the_colour_at_the_shape_word(objective):
    encoder, tokenizer = _encoder()
    prompts = [s.prompt for s in generate_scenes(600, 0, "train")]
    result = pretrain_text_encoder(encoder, tokenizer, prompts, steps=300, batch=64, lr=3e-3,
                                   max_tokens=24, seed=0, device="cpu", objective=objective,
                                   context_window=3, log=lambda _: None)
    assert result["objective"] == objective and result["steps"] == 300
    assert result["word_accuracy"] > 0.8
    # Far further from a bag of words than the denoising objective gets in the same steps.
    assert result["order_blindness_after"] < 0.97 < result["order_blindness_before"]
    assert abs(order_blindness(encoder, tokenizer) - result["order_blindness_after"]) < 1e-4
    # Only the encoder is kept: the heads are thrown away, the encoder's keys are unchanged.
    assert set(encoder.state_dict()) == set(_encoder()[0].state_dict())


def test_preceding_predicts_only_the_words_before():
    encoder, _ = _encoder()
    task = _ContextTask(encoder, 3, following=False)
    assert task.offsets == [-3, -2, -1] and task.heads.out_features == 3 * encoder.config.vocab_size


def test_pretraining_options_are_checked():
    encoder, tokenizer = _encoder()
    with pytest.raises(ValueError, match="choose one of denoise, context, preceding"):
        pretrain_text_encoder(encoder, tokenizer, ["a red circle"], steps=1, batch=1, lr=1e-3,
                              max_tokens=8, seed=0, device="cpu", objective="clip")
    with pytest.raises(ValueError, match="context window must be >= 1"):
        pretrain_text_encoder(encoder, tokenizer, ["a red circle"], steps=1, batch=1, lr=1e-3,
                              max_tokens=8, seed=0, device="cpu", objective="context",
                              context_window=0)
