"""PixArtTransformer2DModel (PixArt-alpha / -Sigma): epsilon (+ learned sigma, dropped)."""

from l2p.adapters.base import PatchEmbedAdapter, encode_prompt_with_mask, without_text_padding


class PixArtAdapter(PatchEmbedAdapter):
    source_class = "PixArtTransformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    # The final adaLN table modulates the features the head reads.
    output_modules = ("norm_out", "scale_shift_table")
    prediction = "epsilon"

    encode_prompts = staticmethod(encode_prompt_with_mask)

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        embeds, mask = without_text_padding(cond["prompt_embeds"], cond["prompt_attention_mask"])
        return dict(hidden_states=x_t, encoder_hidden_states=embeds,
                    encoder_attention_mask=mask, timestep=times,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
