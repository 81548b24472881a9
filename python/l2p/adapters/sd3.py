"""SD3Transformer2DModel (SD3 / SD3.5): flow velocity, timestep = sigma * 1000."""

from l2p.adapters.base import PatchEmbedAdapter


class SD3Adapter(PatchEmbedAdapter):
    source_class = "SD3Transformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out",)
