"""QwenImageTransformer2DModel: packed 2x2 latent tokens into ``img_in``, RoPE from
``img_shapes``. Text-to-image only: the edit variant's extra reference-image tokens are not
pixel tokens.

Prompts are encoded by QwenImagePipeline.encode_prompt (its chat template, the template
tokens it drops, Qwen2.5-VL's last hidden states) and kept per caption without padding; each
call pads them to the longest of its batch with the attention mask the pipeline would pass
(None when no caption is padded), so captions of any lengths share a batch (caption dropout,
cond and uncond of CFG in one call). Guidance is the pipeline's true CFG (``true_cfg_scale``;
``guidance_scale`` only feeds a guidance embedding where the config has one), with its
rescale of the guided prediction to the conditional's norm per token, here per pixel patch."""

import torch

from l2p.adapters.base import PackedLatentAdapter


class QwenImageAdapter(PackedLatentAdapter):
    source_class = "QwenImageTransformer2DModel"
    input_module = "img_in"
    output_module = "proj_out"
    block_groups = ("transformer_blocks",)
    embedding_arguments = ("prompt_embeds", "prompt_embeds_mask")
    output_modules = ("norm_out",)
    flow_sigmas = True
    distilled_guidance = True

    def check_arguments(self, arguments, rows, cols, patch):
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

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        embeds, mask = pipe.encode_prompt(prompts, device=device)
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(dim=1).tolist()
        return {"prompt_embeds": [e[:n] for e, n in zip(embeds, lengths)]}  # variable-length

    @classmethod
    def conditioning_from_embeddings(cls, given):
        # QwenImagePipeline's padded batch and its mask (None: nothing padded), unpadded per
        # caption as encode_prompts keeps them.
        embeds, mask = given.get("prompt_embeds"), given.get("prompt_embeds_mask")
        cls._refuse_unknown_embeddings(given)
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"prompt_embeds must be a tensor (B, L, D), got {got}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"prompt_embeds_mask must be (B, L) = {tuple(embeds.shape[:2])}, got {got}")
        lengths = [embeds.shape[1]] * len(embeds) if mask is None else mask.sum(dim=1).tolist()
        return {"prompt_embeds": [e[:n] for e, n in zip(embeds, lengths)]}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        embeds = list(cond["prompt_embeds"])
        longest = max(e.shape[0] for e in embeds)
        padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        mask = None
        if any(e.shape[0] < longest for e in embeds):
            mask = torch.stack([(torch.arange(longest) < e.shape[0]).long() for e in embeds]).to(x_t.device)
        p = model.config.patch_size
        img_shapes = [[(1, x_t.shape[-2] // p, x_t.shape[-1] // p)]] * x_t.shape[0]
        kwargs = dict(hidden_states=x_t, timestep=times.to(x_t.dtype) / 1000, encoder_hidden_states=padded,
                      encoder_hidden_states_mask=mask, img_shapes=img_shapes)
        if model.config.source_config.get("guidance_embeds", False):
            kwargs["guidance"] = torch.full((x_t.shape[0],), float(guidance), device=x_t.device)
        return kwargs

    @staticmethod
    def guide(uncond, cond, scale, patch_size, options):
        # QwenImagePipeline rescales the guided prediction of each packed latent token to the
        # norm of the conditional one; a pixel token is one patch_size^2 x 3 patch.
        guided = uncond + scale * (cond - uncond)
        b, c, h, w = cond.shape

        def patch_norm(x):
            patches = x.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
            return torch.linalg.vector_norm(patches, dim=(1, 3, 5), keepdim=True)

        ratio = patch_norm(cond) / patch_norm(guided)
        shape = (b, c, h // patch_size, patch_size, w // patch_size, patch_size)
        return (guided.reshape(shape) * ratio).reshape(b, c, h, w)
