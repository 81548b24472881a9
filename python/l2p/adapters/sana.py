"""SanaTransformer2DModel: flow velocity; DC-AE latents are 32x smaller, so P = 32."""

from l2p.adapters.base import PatchEmbedAdapter


class SanaAdapter(PatchEmbedAdapter):
    source_class = "SanaTransformer2DModel"
    input_module = "patch_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out", "scale_shift_table")
    vae_scale_factor = 32

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                    encoder_attention_mask=cond["prompt_attention_mask"], timestep=times)
