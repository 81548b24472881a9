"""QwenImageTransformer2DModel: packed 2x2 latent tokens into ``img_in``, RoPE from
``img_shapes``. Text-to-image only: the edit variant's extra reference-image tokens are not
pixel tokens."""

from l2p.adapters.base import PackedLatentAdapter


class QwenImageAdapter(PackedLatentAdapter):
    source_class = "QwenImageTransformer2DModel"
    input_module = "img_in"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out",)
    flow_sigmas = True

    def check_arguments(self, arguments, rows, cols):
        shapes = arguments.get("img_shapes")
        if shapes is None:
            return
        for sample in shapes:
            sample = sample if isinstance(sample, list) else [sample]
            if len(sample) != 1 or tuple(sample[0]) != (1, rows, cols):
                raise ValueError(
                    f"img_shapes {shapes} does not describe one image with the {rows}x{cols} "
                    f"token grid of the pixels; pass [[(1, {rows}, {cols})]] * batch "
                    f"(reference-image editing is not supported in pixel space)"
                )
