"""SanaTransformer2DModel: flow velocity; DC-AE latents are 32x smaller, so P = 32. Prompts are
encoded as SanaPipeline.__call__ encodes them by default: with the "complex human
instruction" (the default of the pipeline class's ``complex_human_instruction`` argument)
before each prompt and, per Sana's paper, only the first token and the last
``max_sequence_length - 1`` kept; negative prompts without it. The same for training and
sampling."""

import inspect

from l2p.adapters.base import PatchEmbedAdapter, without_text_padding


def default_complex_human_instruction(pipe):
    """The instruction the pipeline class prepends by default (None where it has none)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    return None if parameter is None else parameter.default


class SanaAdapter(PatchEmbedAdapter):
    source_class = "SanaTransformer2DModel"
    input_module = "patch_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    embedding_arguments = ("prompt_embeds", "prompt_attention_mask")
    output_modules = ("norm_out", "scale_shift_table")
    vae_scale_factor = 32

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device,
            complex_human_instruction=default_complex_human_instruction(pipe))
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @staticmethod
    def encode_negative_prompts(pipe, prompts, device):
        # SanaPipeline.encode_prompt encodes negatives without the instruction; with none, the
        # positive branch's token selection keeps every token, so the two agree.
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                complex_human_instruction=None)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        embeds, mask = without_text_padding(cond["prompt_embeds"], cond["prompt_attention_mask"])
        return dict(hidden_states=x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                    timestep=times)
