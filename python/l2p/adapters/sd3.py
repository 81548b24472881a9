"""SD3Transformer2DModel (SD3 / SD3.5): flow velocity, timestep = sigma * 1000."""

from l2p.adapters.base import PatchEmbedAdapter


class SD3Adapter(PatchEmbedAdapter):
    source_class = "SD3Transformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    embedding_arguments = ("prompt_embeds", "pooled_prompt_embeds")
    output_modules = ("norm_out",)
    max_shift = 1.16

    def check_arguments(self, arguments, rows, cols, patch):
        # The position table is cropped to the token grid and holds pos_embed_max_size tokens
        # a side; diffusers' own error says so in tokens, which a pixel-space caller never sees.
        limit = self.config.get("pos_embed_max_size")
        if limit is not None and max(rows, cols) > limit:
            raise ValueError(
                f"{rows * patch}x{cols * patch} px is beyond this SD3 model's position table: at "
                f"most {limit * patch} px a side at pixel patch {patch} ({limit} tokens, "
                f"pos_embed_max_size); sample smaller, or convert with a larger --patch-size"
            )

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, device=device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                    pooled_projections=cond["pooled_prompt_embeds"], timestep=times)
