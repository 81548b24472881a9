"""Tiny models built from configs, for tests that need a real diffusers pipeline on a CPU.

Nothing here downloads: every tokenizer and model is constructed in memory (random weights)
and, where a test needs a folder on disk, saved with ``save_pretrained(safe_serialization=True)``
exactly as a user's checkpoint would be. Shared by the data, trainer and sampler tests.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Character-level vocabulary: every printable ASCII character is one token, so any English
# prompt tokenizes without an <unk>, and sequences stay short enough for 2-core test runs.
_CHARS = string.ascii_letters + string.digits + string.punctuation


def build_tiny_tokenizer(path: str | Path | None = None):
    """A T5-style (Unigram, SentencePiece-compatible) tokenizer with a ~100-token character
    vocabulary: <pad>=0, </s>=1, <unk>=2, "▁", then one token per printable character."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in _CHARS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


def build_tiny_pixart_sigma_pipeline(path: str | Path | None = None, *, seed: int = 0):
    """A PixArt-Sigma pipeline with a 2-layer, 32-wide transformer, a 2-level AutoencoderKL
    (vae factor 2) and a 1-layer T5 encoder. ``max_sequence_length`` 300 of the real pipeline
    still applies; with a 32-wide encoder that costs nothing. Saved to ``path`` when given."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, caption_channels=32, sample_size=16, patch_size=2,
        norm_num_groups=32, interpolation_scale=1,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    ).eval()
    scheduler = DPMSolverMultistepScheduler()
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def build_tiny_causal_lm(path: str | Path, *, seed: int = 0) -> Path:
    """A 1-layer GPT-2 with random weights and the character tokenizer, saved to ``path``
    (the layout AutoModelForCausalLM/AutoTokenizer read). Its text is gibberish; it exists to
    prove that a local model path is honoured."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
