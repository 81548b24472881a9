"""Pretraining the toy source's T5 text encoder on prompts alone, as real T5 was pretrained on
text before PixArt, SD3 or FLUX used it.

Why: a T5 encoder at its initialisation is close to a bag of words. Its token embeddings
dominate the residual stream, so the output at "triangle" is nearly the same in "a red triangle
and a purple cross" as in "a purple triangle and a red cross" (cosine 0.9998 for the toy's T5
untrained, 0.9999 after the shipped source's whole diffusion training). The colour before a
shape leaves only a small trace there, and the diffusion transformer reads the prompt only
through cross-attention, which has no notion of order: whatever it learns of which colour goes
with which shape, or which object is left of which (the categories the toy source fails), it
must learn from that trace.

Three objectives (:data:`OBJECTIVES`):

- "denoise", T5's own kind: a T5 decoder reconstructs each prompt from a corrupted copy. The
  encoder must keep the word order somewhere in its outputs, but not at the word it concerns: on
  the toy's T5 it lowers :func:`order_blindness` only to about 0.993.
- "context": each word's output alone must predict the words around it, so a shape word's output
  holds its own phrase (its colour and count, the relation after it). On the toy's T5 it lowers
  order blindness to about 0.84, and a linear probe reads the colour before a shape from the
  shape word's output for colour-shape pairs the prompts never contained. The price: a colour
  word's output then depends on the shape after it, so a pair never seen in training gives the
  transformer vectors it never saw (RESULTS.md, "A context objective").
- "preceding": the same with only the words before each word, so a colour word's output does not
  depend on the shape after it, while the shape word still holds the colour before it.
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


def _context_targets(ids: torch.Tensor, mask: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """(batch, tokens, len(offsets)) ids of the words at ``offsets`` from each real token; -100
    (ignored) beyond the prompt and at padding."""
    real = mask.bool()
    reach = max(abs(o) for o in offsets)
    # Padding and the margins beyond the prompt read as "ignored", so each offset is one slice.
    padded = torch.nn.functional.pad(ids.masked_fill(~real, -100), (reach, reach), value=-100)
    length = ids.shape[1]
    targets = torch.stack([padded[:, reach + o: reach + o + length] for o in offsets], dim=-1)
    return targets.masked_fill(~real.unsqueeze(-1), -100)


class _DenoisingTask(torch.nn.Module):
    """T5's own objective: a T5 decoder of the encoder's size reconstructs each whole prompt
    from a copy with words replaced by ``<unk>``. The decoder reads the encoder only through
    cross-attention, so to put the words back in order the encoder must write each word's place
    into its outputs, though not necessarily at the word it concerns."""

    def __init__(self, text_encoder, tokenizer, corrupt_rate: float):
        super().__init__()
        from transformers import T5ForConditionalGeneration

        config = copy.deepcopy(text_encoder.config)
        config.num_decoder_layers = config.num_layers
        config.is_encoder_decoder = True
        config.tie_word_embeddings = False
        self.model = T5ForConditionalGeneration(config)
        # Start from the encoder as it is (random, or a trained source's when one is continued).
        missing, unexpected = self.model.load_state_dict(text_encoder.state_dict(), strict=False)
        if unexpected or any(k.startswith("encoder.") for k in missing):
            raise RuntimeError(f"the text encoder does not fit a T5 of its config: missing "
                               f"{missing}, unexpected {unexpected}")
        self.tokenizer = tokenizer
        self.corrupt_rate = corrupt_rate

    def encoder_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items()
                if k.startswith(("encoder.", "shared."))}

    def loss(self, ids, mask, gen) -> torch.Tensor:
        labels = ids.masked_fill(mask == 0, -100)
        corrupted = _corrupt(ids, mask, self.tokenizer, self.corrupt_rate, gen)
        return self.model(input_ids=corrupted, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def word_accuracy(self, ids, mask) -> float:
        logits = self.model(input_ids=ids, attention_mask=mask,
                            labels=ids.masked_fill(mask == 0, -100)).logits
        return float((logits.argmax(-1) == ids)[mask.bool()].float().mean())


class _ContextTask(torch.nn.Module):
    """Each word's output names the words around it: a linear head per offset predicts the word
    ``window`` places before (and, with ``following``, after) from the encoder's output at that
    word alone. What a shape word's output must then hold is its own phrase: the colour and count
    before it, the "of" before it or the relation after it, which is where the transformer's
    cross-attention looks for them."""

    def __init__(self, text_encoder, window: int, following: bool):
        super().__init__()
        if window < 1:
            raise ValueError(f"the context window must be >= 1 word, got {window}")
        self.encoder = text_encoder
        self.offsets = [*range(-window, 0), *(range(1, window + 1) if following else ())]
        config = text_encoder.config
        self.heads = torch.nn.Linear(config.d_model, len(self.offsets) * config.vocab_size)

    def encoder_state(self) -> dict:
        return self.encoder.state_dict()

    def _logits_and_targets(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask)[0]
        logits = self.heads(hidden).unflatten(-1, (len(self.offsets), -1))
        return logits, _context_targets(ids, mask, self.offsets)

    def loss(self, ids, mask, gen) -> torch.Tensor:
        logits, targets = self._logits_and_targets(ids, mask)
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                                 ignore_index=-100)

    @torch.no_grad()
    def word_accuracy(self, ids, mask) -> float:
        logits, targets = self._logits_and_targets(ids, mask)
        known = targets != -100
        return float((logits.argmax(-1) == targets)[known].float().mean())


OBJECTIVES = ("denoise", "context", "preceding")


def pretrain_text_encoder(text_encoder, tokenizer, prompts: list[str], *, steps: int, batch: int,
                          lr: float, max_tokens: int, seed: int, device, objective: str = "denoise",
                          corrupt_rate: float = 0.15, context_window: int = 4,
                          log: Callable[[str], None] = print) -> dict:
    """Train ``text_encoder`` (a T5EncoderModel, in place) on ``prompts`` alone with
    ``objective``: "denoise" (:class:`_DenoisingTask`), "context" (:class:`_ContextTask`, the
    words on both sides) or "preceding" (the words before each word only).
    What the objective adds (decoder, heads) is thrown away afterwards. Returns what it
    measured: the final loss, the objective's word accuracy on uncorrupted prompts, and
    :func:`order_blindness` before and after."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown text pretraining objective {objective!r}; choose one of "
                         f"{', '.join(OBJECTIVES)}")
    device = torch.device(device)
    was_training = text_encoder.training
    before = order_blindness(text_encoder, tokenizer, max_tokens)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    task = (_DenoisingTask(text_encoder, tokenizer, corrupt_rate) if objective == "denoise"
            else _ContextTask(text_encoder, context_window, following=objective == "context"))
    task.to(device).train()
    all_ids, all_mask = (t.to(device) for t in tokenize_prompts(tokenizer, prompts, max_tokens))
    opt = torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = torch.randint(0, len(prompts), (batch,), generator=gen).to(device)
        loss = task.loss(all_ids[idx], all_mask[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"text encoder step {step + 1}/{steps} {objective} loss {loss.item():.4f}")
    task.eval()
    accuracy = task.word_accuracy(all_ids[:512], all_mask[:512])
    text_encoder.load_state_dict(task.encoder_state())
    text_encoder.train(was_training)
    return {"objective": objective, "steps": steps, "final_loss": round(float(loss.item()), 5),
            "word_accuracy": round(accuracy, 4),
            "order_blindness_before": round(before, 4),
            "order_blindness_after": round(order_blindness(text_encoder, tokenizer, max_tokens), 4)}
