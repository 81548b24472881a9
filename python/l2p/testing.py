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


def _tiny_decoder_encoder(kind: str, vocab_size: int, hidden: int = 24):
    """A 1-layer Gemma2 ("gemma2") or Qwen3 ("qwen3") text model, ``hidden`` wide."""
    from transformers import Gemma2Config, Gemma2Model, Qwen3Config, Qwen3Model

    config_cls, model_cls = {"gemma2": (Gemma2Config, Gemma2Model), "qwen3": (Qwen3Config, Qwen3Model)}[kind]
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                        max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return model_cls(config).eval()


def _tiny_flow_vae(levels: int = 2):
    """An AutoencoderKL with 16 latent channels, 8 wide, of factor 2 ** (levels - 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8,) * levels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, shift_factor=0.0).eval()


def _save(pipe, path):
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def build_tiny_sana_pipeline(path: str | Path | None = None, *, seed: int = 0):
    """A SanaPipeline: 2-layer, 32-wide transformer (patch 1), a 3-level AutoencoderDC
    (factor 4, so the pixel patch is 4), a 1-layer Gemma2 encoder and the flow-mode
    DPM-Solver Sana ships with."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    transformer = SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        sample_size=8, patch_size=1,
    ).eval()
    vae = AutoencoderDC(
        latent_channels=8, attention_head_dim=8, encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
    ).eval()
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return _save(SanaPipeline(tokenizer=tokenizer, text_encoder=_tiny_decoder_encoder("gemma2", len(tokenizer)),
                              vae=vae, transformer=transformer, scheduler=scheduler), path)


def build_tiny_lumina2_pipeline(path: str | Path | None = None, *, seed: int = 0):
    """A Lumina2Pipeline: 2-layer, 64-wide transformer (patch 2), a factor-8 AutoencoderKL
    (Lumina2Pipeline assumes 8; pixel patch 16) and a 1-layer Gemma2 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    # RoPE axis 0 counts caption tokens (256, the pipeline's max_sequence_length) and then sits
    # at the caption length for every image token.
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12),
        axes_lens=(300, 32, 32), cap_feat_dim=24,
    ).eval()
    text_encoder = _tiny_decoder_encoder("gemma2", len(tokenizer))
    return _save(Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                 vae=_tiny_flow_vae(levels=4), text_encoder=text_encoder, tokenizer=tokenizer), path)


# The Qwen3 chat layout ZImagePipeline wraps each prompt in (it passes enable_thinking=True).
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def build_tiny_z_image_pipeline(path: str | Path | None = None, *, seed: int = 0):
    """A ZImagePipeline: 2-layer, 64-wide transformer (patch 2), a factor-2 AutoencoderKL
    (pixel patch 4), a 1-layer Qwen3 encoder and a chat-templated character tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    # RoPE axis 0 counts caption tokens (up to 512, the pipeline's max_sequence_length).
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[8, 12, 12], axes_lens=[1024, 32, 32],
    ).eval()
    return _save(ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_flow_vae(),
                                text_encoder=_tiny_decoder_encoder("qwen3", len(tokenizer)), tokenizer=tokenizer,
                                transformer=transformer), path)


# A few ImageNet classes (id -> comma-separated names, as DiT checkpoints store id2label).
TINY_DIT_CLASSES = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 207: "golden retriever"}


def build_tiny_dit_pipeline(path: str | Path | None = None, *, seed: int = 0):
    """A DiTPipeline: 3-layer, 32-wide transformer (patch 2, learned sigma) with DiT's 1000
    classes (+ the null class), a factor-2 AutoencoderKL (pixel patch 4), DDIM, and
    ``id2label`` in model_index.json as the published checkpoints have it."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=16, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(clip_sample=False),
                       id2label=TINY_DIT_CLASSES)
    pipe.register_to_config(id2label={str(k): v for k, v in TINY_DIT_CLASSES.items()})  # not saved otherwise
    return _save(pipe, path)


def _tiny_qwen_tokenizer():
    """A Qwen2 (byte-level BPE) tokenizer without merges: one token per byte, plus the chat
    tokens of QwenImagePipeline's template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def build_tiny_qwen_image_pipeline(path: str | Path | None = None, *, seed: int = 0):
    """A QwenImagePipeline: 3-layer, 32-wide transformer, a factor-2 AutoencoderKLQwenImage
    (pixel patch 4), a 1-layer Qwen2.5-VL (24 wide, 1-block vision tower) with a byte-level
    tokenizer, and a dynamically shifted FlowMatchEuler scheduler."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = _tiny_qwen_tokenizer()
    special = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=special[0], eos_token_id=special[1], pad_token_id=special[0],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24,
                           fullatt_block_indexes=[0]),
    )).eval()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                              axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False]).eval()
    # Qwen-Image's scheduler (exponential dynamic shift, shift_terminal), with sequence
    # bounds scaled to tiny images so that mu depends on the size.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential",
                                                base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5,
                                                max_shift=0.9, shift_terminal=0.02)
    return _save(QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   transformer=transformer), path)


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
