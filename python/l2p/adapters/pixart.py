"""PixArtTransformer2DModel (PixArt-alpha / -Sigma): epsilon (+ learned sigma, dropped)."""

import torch

from l2p.adapters.base import PatchEmbedAdapter, encode_prompt_with_mask, without_text_padding


def uses_additional_conditions(config) -> bool:
    """Whether the transformer's adaLN takes resolution and aspect-ratio embeddings, decided as
    PixArtTransformer2DModel decides it: the config's flag, or when unset, sample_size 128
    (PixArt-alpha's 1024 px checkpoints)."""
    use = config.get("use_additional_conditions")
    return bool(use) if use is not None else config.get("sample_size") == 128


class PixArtAdapter(PatchEmbedAdapter):
    source_class = "PixArtTransformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    embedding_arguments = ("prompt_embeds", "prompt_attention_mask")
    # The final adaLN table modulates the features the head reads.
    output_modules = ("norm_out", "scale_shift_table")
    prediction = "epsilon"

    encode_prompts = staticmethod(encode_prompt_with_mask)

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        embeds, mask = without_text_padding(cond["prompt_embeds"], cond["prompt_attention_mask"])
        added = {"resolution": None, "aspect_ratio": None}
        # model: the pixel model, or the source transformer itself (whose config is the source's)
        if uses_additional_conditions(model.config.get("source_config", model.config)):
            # As PixArtAlphaPipeline passes them: the generated image's [height, width] in
            # pixels and height / width, one row per sample. x_t is that image (pixels, not
            # latents), so its size is the one the source pipeline would have been asked for.
            b, (h, w) = x_t.shape[0], x_t.shape[-2:]
            like = dict(dtype=embeds.dtype, device=x_t.device)
            added = {"resolution": torch.tensor([[h, w]], **like).expand(b, 2),
                     "aspect_ratio": torch.tensor([[h / w]], **like).expand(b, 1)}
        return dict(hidden_states=x_t, encoder_hidden_states=embeds,
                    encoder_attention_mask=mask, timestep=times, added_cond_kwargs=added)
