"""FluxTransformer2DModel: packed 2x2 latent tokens (B, N, 64) into ``x_embedder``; the
double-stream then the single-stream blocks form one block sequence."""

from l2p.adapters.base import PackedLatentAdapter


class FluxAdapter(PackedLatentAdapter):
    source_class = "FluxTransformer2DModel"
    input_module = "x_embedder"
    output_module = "proj_out"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
    output_modules = ("norm_out",)

    @property
    def latent_patch(self) -> int:
        # Packing folds 2x2 latent pixels into one token; config.patch_size is 1.
        return 2 * int(self.config["patch_size"])

    def check_arguments(self, arguments, rows, cols):
        img_ids = arguments.get("img_ids")
        if img_ids is not None and img_ids.shape[-2] != rows * cols:
            raise ValueError(
                f"img_ids has {img_ids.shape[-2]} rows but the image gives a {rows}x{cols} "
                f"token grid ({rows * cols} tokens); build img_ids for that grid (height and "
                f"width / pixel patch), as the FLUX pipeline does for its latent"
            )
