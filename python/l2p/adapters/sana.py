"""SanaTransformer2DModel: flow velocity; DC-AE latents are 32x smaller, so P = 32."""

from l2p.adapters.base import PatchEmbedAdapter


class SanaAdapter(PatchEmbedAdapter):
    source_class = "SanaTransformer2DModel"
    input_module = "patch_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out", "scale_shift_table")
    vae_scale_factor = 32
