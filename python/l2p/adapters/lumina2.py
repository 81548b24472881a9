"""Lumina2Transformer2DModel (Lumina-Image 2.0): latents patchified inside
``rope_embedder``, then ``x_embedder``; joint sequence [caption, image] per sample with the
caption length from the attention mask. ``norm_out.linear_2`` is the output projection
(``linear_1`` the final scale). The pipeline negates the output. Guidance is Lumina2Pipeline's:
CFG off for the steps past ``cfg_trunc_ratio``, and ``cfg_normalization`` (on by default)
rescales the guided output to the conditional one's norm along the last axis, which in pixel
space is each pixel row of each colour channel (in the pipeline, each latent row)."""

import torch

from l2p.adapters.base import SourceAdapter, check_rope_grid, encode_prompt_with_mask


class Lumina2Adapter(SourceAdapter):
    source_class = "Lumina2Transformer2DModel"
    input_module = "x_embedder"
    output_module = "norm_out.linear_2"
    block_groups = ("noise_refiner", "layers")
    embedding_arguments = ("prompt_embeds", "prompt_attention_mask")
    output_modules = ("norm_out",)
    output_sign = -1
    flow_sigmas = True

    def check_arguments(self, arguments, rows, cols, patch):
        check_rope_grid(self.source_class, self.config.get("axes_lens"), rows, cols, patch)

    def image_tokens(self, captured, n_tokens, arguments):
        mask = arguments["encoder_attention_mask"]
        starts = mask.sum(dim=1).tolist()
        return torch.stack([captured[i, s : s + n_tokens] for i, s in enumerate(starts)])

    def block_input_tokens(self, group, hidden_states, n_tokens, arguments):
        # The noise refiner sees the image tokens alone; the joint blocks [caption, image].
        if group == "layers":
            return self.image_tokens(hidden_states, n_tokens, arguments)
        return super().block_input_tokens(group, hidden_states, n_tokens, arguments)

    encode_prompts = staticmethod(encode_prompt_with_mask)

    @staticmethod
    def encode_negative_prompts(pipe, prompts, device):
        # Lumina2Pipeline prepends its system prompt to the prompts but not to the negative
        # prompts; its public encode_prompt does that only on its negative branch (the
        # positive one, with the system prompt, is encoded too and dropped).
        _, _, embeds, mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                negative_prompt=prompts, device=device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        return dict(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                    encoder_attention_mask=cond["prompt_attention_mask"],
                    timestep=1.0 - times / 1000.0)

    guidance_options = {"cfg_trunc_ratio": 1.0, "cfg_normalization": True}

    @staticmethod
    def guides_step(step, num_steps, t, options):
        return (step + 1) / num_steps <= options["cfg_trunc_ratio"]

    @staticmethod
    def guide(uncond, cond, scale, patch_size, options):
        guided = uncond + scale * (cond - uncond)
        if options["cfg_normalization"]:
            norm = torch.linalg.vector_norm
            guided = guided * (norm(cond, dim=-1, keepdim=True) / norm(guided, dim=-1, keepdim=True))
        return guided
