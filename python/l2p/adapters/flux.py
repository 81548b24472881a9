"""FluxTransformer2DModel: packed 2x2 latent tokens (B, N, 64) into ``x_embedder``; the
double-stream then the single-stream blocks form one block sequence."""

import torch

from l2p.adapters.base import PackedLatentAdapter


class FluxAdapter(PackedLatentAdapter):
    source_class = "FluxTransformer2DModel"
    input_module = "x_embedder"
    output_module = "proj_out"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
    embedding_arguments = ("prompt_embeds", "pooled_prompt_embeds")
    output_modules = ("norm_out",)
    flow_sigmas = True
    distilled_guidance = True

    @property
    def latent_patch(self) -> int:
        # Packing folds 2x2 latent pixels into one token; config.patch_size is 1.
        return 2 * int(self.config["patch_size"])

    def check_arguments(self, arguments, rows, cols, patch):
        img_ids = arguments.get("img_ids")
        if img_ids is not None and img_ids.shape[-2] != rows * cols:
            raise ValueError(
                f"img_ids has {img_ids.shape[-2]} rows but the image gives a {rows}x{cols} "
                f"token grid ({rows * cols} tokens); build img_ids for that grid (height and "
                f"width / pixel patch), as the FLUX pipeline does for its latent"
            )

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        from diffusers import FluxPipeline

        p = model.config.patch_size
        rows, cols = x_t.shape[-2] // p, x_t.shape[-1] // p
        embeds = cond["prompt_embeds"]
        # Position ids in float32, where FluxPipeline makes them in the model's dtype: bfloat16
        # holds integers exactly only up to 256, so past 256 tokens a side (4096 px at patch 16)
        # columns and rows would share ids. The transformer reads them as float32 either way
        # (FluxPosEmbed), so up to 256 nothing changes.
        img_ids = FluxPipeline._prepare_latent_image_ids(x_t.shape[0], rows, cols, x_t.device, torch.float32)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=torch.float32)
        kwargs = dict(hidden_states=x_t, encoder_hidden_states=embeds,
                      pooled_projections=cond["pooled_prompt_embeds"], timestep=times / 1000.0,
                      img_ids=img_ids, txt_ids=txt_ids)
        if model.config.source_config.get("guidance_embeds", False):
            kwargs["guidance"] = torch.full((x_t.shape[0],), float(guidance), device=x_t.device)
        return kwargs
