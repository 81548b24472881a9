"""SanaTransformer2DModel: flow velocity; DC-AE latents are 32x smaller, so P = 32. Prompts are
encoded by encode_prompt's defaults, without the complex human instruction that
SanaPipeline.__call__ prepends by default (the same for training and sampling)."""

from l2p.adapters.base import PatchEmbedAdapter, encode_prompt_with_mask


class SanaAdapter(PatchEmbedAdapter):
    source_class = "SanaTransformer2DModel"
    input_module = "patch_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out", "scale_shift_table")
    vae_scale_factor = 32

    encode_prompts = staticmethod(encode_prompt_with_mask)

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                    encoder_attention_mask=cond["prompt_attention_mask"], timestep=times)
