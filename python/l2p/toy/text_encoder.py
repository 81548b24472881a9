"""Pretraining the toy source's T5 text encoder on prompts alone, as real T5 was pretrained on
text before PixArt, SD3 or FLUX used it.

Why: a T5 encoder at its initialisation is close to a bag of words. Its token embeddings
dominate the residual stream, so the output at "triangle" is nearly the same in "a red triangle
and a purple cross" as in "a purple triangle and a red cross" (cosine 0.9998 for the toy's T5
untrained, 0.9999 after the shipped source's whole diffusion training). The colour before a
shape leaves only a small trace there (a linear probe on the shipped source's encoder recovers
it for 60% of shape words, against 17% with the encoder's attention switched off), and the
diffusion transformer reads the prompt only through cross-attention, which has no notion of
order: whatever it learns of which colour goes with which shape, or which object is left of
which (the categories the toy source fails), it must learn from that trace.

The objective is T5's own kind, denoising: a T5 decoder of the encoder's size reconstructs each
whole prompt from a copy with some words replaced by ``<unk>``. The decoder reads the encoder
only through cross-attention, so to put the words back in order the encoder must write each
word's place and neighbours into its outputs. :func:`order_blindness` measures how much of the
output at a shape word depends on the colour before it.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from l2p.toy.world import PLURALS, SHAPES

# Prompt pairs that differ only in which colour goes with which shape: a bag of words encodes
# both sides of each pair the same.
SWAPPED_PAIRS = (
    ("a red triangle and a purple cross", "a purple triangle and a red cross"),
    ("a yellow square and a green circle", "a green square and a yellow circle"),
    ("a blue square and an orange circle", "an orange square and a blue circle"),
    ("a white circle to the left of a red square", "a red circle to the left of a white square"),
    ("two green crosses above a yellow triangle", "two yellow crosses above a green triangle"),
)
# Every word that names a shape, singular or plural.
SHAPE_WORDS = frozenset(SHAPES) | frozenset(PLURALS.values())


def tokenize_prompts(tokenizer, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) as PixArtSigmaPipeline.encode_prompt tokenizes: padding
    beyond the prompt is masked, so a shorter max length changes nothing for real tokens."""
    tokens = tokenizer([p.lower().strip() for p in prompts], padding="max_length",
                       max_length=max_tokens, truncation=True, add_special_tokens=True,
                       return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


def shape_positions(pieces: list[str]) -> list[int]:
    """Where the tokenizer's pieces name a shape (the toy tokenizer keeps words whole)."""
    return [i for i, piece in enumerate(pieces) if piece.lstrip("\u2581") in SHAPE_WORDS]


@torch.no_grad()
def order_blindness(text_encoder, tokenizer, max_tokens: int = 24) -> float:
    """Mean cosine similarity between the encoder's outputs at the shape words of prompts that
    swap two colours (:data:`SWAPPED_PAIRS`): 1.0 for an encoder that cannot tell them apart,
    lower the more each shape word carries the colour before it."""
    was_training = text_encoder.training
    text_encoder.eval()
    device = next(text_encoder.parameters()).device
    sims = []
    for a, b in SWAPPED_PAIRS:
        ids, mask = tokenize_prompts(tokenizer, [a, b], max_tokens)
        out = text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device))[0].float()
        for i in shape_positions(tokenizer.convert_ids_to_tokens(ids[0])):
            sims.append(torch.nn.functional.cosine_similarity(out[0, i], out[1, i], dim=0).item())
    text_encoder.train(was_training)
    return float(sum(sims) / len(sims))


def _corrupt(ids: torch.Tensor, mask: torch.Tensor, tokenizer, rate: float,
             gen: torch.Generator) -> torch.Tensor:
    """``ids`` with each real word (not padding, not the end token) replaced by the unknown
    token with probability ``rate``."""
    words = mask.bool() & (ids != tokenizer.eos_token_id)
    hit = (torch.rand(ids.shape, generator=gen) < rate).to(ids.device) & words
    return torch.where(hit, torch.full_like(ids, tokenizer.unk_token_id), ids)


def pretrain_text_encoder(text_encoder, tokenizer, prompts: list[str], *, steps: int, batch: int,
                          lr: float, corrupt_rate: float, max_tokens: int, seed: int, device,
                          log: Callable[[str], None] = print) -> dict:
    """Train ``text_encoder`` (a T5EncoderModel, in place) with a T5 decoder of its size on
    reconstructing ``prompts`` from corrupted copies. Returns what it measured: the final loss,
    the word accuracy of the reconstruction on uncorrupted prompts, and :func:`order_blindness`
    before and after."""
    from transformers import T5ForConditionalGeneration

    device = torch.device(device)
    before = order_blindness(text_encoder, tokenizer, max_tokens)
    config = copy.deepcopy(text_encoder.config)
    config.num_decoder_layers = config.num_layers
    config.is_encoder_decoder = True
    config.tie_word_embeddings = False
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # Start from the encoder as it is (random, or a trained source's when one is continued).
    missing, unexpected = model.load_state_dict(text_encoder.state_dict(), strict=False)
    if unexpected or any(k.startswith("encoder.") for k in missing):
        raise RuntimeError(f"the text encoder does not fit a T5 of its config: missing {missing}, "
                           f"unexpected {unexpected}")
    model.to(device).train()
    all_ids, all_mask = (t.to(device) for t in tokenize_prompts(tokenizer, prompts, max_tokens))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = torch.randint(0, len(prompts), (batch,), generator=gen).to(device)
        ids, mask = all_ids[idx], all_mask[idx]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=_corrupt(ids, mask, tokenizer, corrupt_rate, gen),
                     attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"text encoder step {step + 1}/{steps} reconstruction loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        ids, mask = all_ids[:512], all_mask[:512]
        logits = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).logits
        real = mask.bool()
        accuracy = float((logits.argmax(-1) == ids)[real].float().mean())
    encoder_state = {k: v for k, v in model.state_dict().items() if k in text_encoder.state_dict()}
    text_encoder.load_state_dict(encoder_state)
    return {"steps": steps, "final_loss": round(float(loss.item()), 5),
            "reconstruction_word_accuracy": round(accuracy, 4),
            "order_blindness_before": round(before, 4),
            "order_blindness_after": round(order_blindness(text_encoder, tokenizer, max_tokens), 4)}
