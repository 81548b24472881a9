"""PixArtTransformer2DModel (PixArt-alpha / -Sigma): epsilon (+ learned sigma, dropped)."""

from l2p.adapters.base import PatchEmbedAdapter


class PixArtAdapter(PatchEmbedAdapter):
    source_class = "PixArtTransformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    # The final adaLN table modulates the features the head reads.
    output_modules = ("norm_out", "scale_shift_table")
    prediction = "epsilon"
