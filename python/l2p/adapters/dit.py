"""DiTTransformer2DModel (class-conditional DiT): epsilon + learned sigma; the sigma
channels are dropped, the pixel model returns epsilon only."""

from l2p.adapters.base import PatchEmbedAdapter


class DiTAdapter(PatchEmbedAdapter):
    source_class = "DiTTransformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out_2"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out", "proj_out_1")
    prediction = "epsilon"

    def check_arguments(self, arguments, rows, cols):
        if rows != cols:
            raise ValueError(
                f"DiTTransformer2DModel only handles square images (its forward unpatchifies "
                f"a square grid); got a {rows}x{cols} token grid"
            )
