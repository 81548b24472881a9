"""Tiny random configs of every supported family, the call arguments each source forward
takes, and the published configs used for the meta-device checks."""

from __future__ import annotations

import torch

# name -> (tiny config, pixel size (H, W) giving a small non-square grid, square size)
TINY = {
    "DiTTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        sample_size=4, patch_size=2, num_embeds_ada_norm=10,
    ),
    "PixArtTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=32, caption_channels=24, sample_size=4, patch_size=2,
        interpolation_scale=1, use_additional_conditions=False,
    ),
    "SD3Transformer2DModel": dict(
        sample_size=4, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=16, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
    ),
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ),
    "SanaTransformer2DModel": dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=24, sample_size=4, patch_size=1,
    ),
    "ZImageTransformer2DModel": dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=3,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[8, 12, 12],
        axes_lens=[64, 32, 32],
    ),
    "QwenImageTransformer2DModel": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
    ),
    "Lumina2Transformer2DModel": dict(
        sample_size=4, patch_size=2, in_channels=16, hidden_size=64, num_layers=3,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
        axes_dim_rope=(8, 12, 12), axes_lens=(64, 32, 32), cap_feat_dim=24,
    ),
}

FAMILIES = tuple(TINY)
# Pixel patch of each family by default; Sana's DC-AE is 32x.
PATCH = {name: (32 if name.startswith("Sana") else 16) for name in FAMILIES}


def image_size(name: str, square: bool = False) -> tuple[int, int]:
    p = PATCH[name]
    if square or name.startswith("DiT"):
        return 2 * p, 2 * p
    return 2 * p, 3 * p


def call_kwargs(name: str, batch: int, height: int, width: int, generator: torch.Generator,
                patch: int | None = None) -> dict:
    """Everything but the noisy input, as the source pipeline would pass it, for the pixel
    patch ``patch`` (default the family's, PATCH)."""
    patch = patch or PATCH[name]
    rows, cols = height // patch, width // patch

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    t = torch.rand(batch, generator=generator)
    if name == "DiTTransformer2DModel":
        return dict(timestep=(t * 999).long(), class_labels=torch.arange(batch) % 10)
    if name == "PixArtTransformer2DModel":
        return dict(encoder_hidden_states=randn(batch, 5, 24), timestep=(t * 999).long(),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if name == "SD3Transformer2DModel":
        return dict(encoder_hidden_states=randn(batch, 5, 32), pooled_projections=randn(batch, 16),
                    timestep=t * 1000)
    if name == "FluxTransformer2DModel":
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        return dict(encoder_hidden_states=randn(batch, 5, 32), pooled_projections=randn(batch, 16),
                    timestep=t, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3),
                    guidance=torch.full((batch,), 3.5))
    if name == "SanaTransformer2DModel":
        return dict(encoder_hidden_states=randn(batch, 5, 24), timestep=t * 1000)
    if name == "ZImageTransformer2DModel":
        return dict(t=t, cap_feats=[randn(3 + 2 * i, 24) for i in range(batch)])
    if name == "QwenImageTransformer2DModel":
        mask = torch.ones(batch, 5, dtype=torch.long)
        mask[-1, 3:] = 0
        return dict(encoder_hidden_states=randn(batch, 5, 24), encoder_hidden_states_mask=mask,
                    timestep=t, img_shapes=[[(1, rows, cols)]] * batch)
    if name == "Lumina2Transformer2DModel":
        mask = torch.ones(batch, 5, dtype=torch.bool)
        mask[-1, 3:] = False  # captions of different lengths: image tokens start elsewhere
        return dict(timestep=t, encoder_hidden_states=randn(batch, 5, 24), encoder_attention_mask=mask)
    raise KeyError(name)


# Published sizes: (config, pixel size, expected tokens, blocks in set_trainable order).
PUBLISHED = {
    "DiTTransformer2DModel": (  # DiT-XL/2-256
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
             num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
        256, 256, 28,
    ),
    "PixArtTransformer2DModel": (  # PixArt-Sigma-XL-2-1024-MS
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
             num_layers=28, cross_attention_dim=1152, caption_channels=4096, sample_size=128,
             patch_size=2, interpolation_scale=2, use_additional_conditions=False),
        1024, 4096, 28,
    ),
    "SD3Transformer2DModel": (  # stable-diffusion-3.5-large
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
        1024, 4096, 38,
    ),
    "FluxTransformer2DModel": (  # FLUX.1-dev
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        1024, 4096, 57,
    ),
    "SanaTransformer2DModel": (  # Sana_1600M_1024px
        dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
             num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
             cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
             patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6),
        1024, 1024, 20,
    ),
    "ZImageTransformer2DModel": (  # Z-Image-Turbo (6B)
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
             n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
             cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
             axes_lens=[1536, 512, 512]),
        1024, 4096, 32,
    ),
    "QwenImageTransformer2DModel": (  # Qwen-Image (20B)
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
             axes_dims_rope=(16, 56, 56)),
        1024, 4096, 60,
    ),
    "Lumina2Transformer2DModel": (  # Lumina-Image-2.0
        dict(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
             num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
             norm_eps=1e-5, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512),
             cap_feat_dim=2304),
        1024, 4096, 28,
    ),
}
