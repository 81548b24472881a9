"""ZImageTransformer2DModel (Z-Image / -Turbo): latents enter as a list of (C, 1, H, W),
are patchified inside (order f, ph, pw, c), padded to a multiple of 32 tokens per image and
embedded together; the image tokens lead the unified [image, caption] sequence. The model
returns the negative velocity (the pipeline negates), t = 1 - sigma. Guidance is
ZImagePipeline's: cond + g (cond - uncond); ``cfg_truncation`` turns it off where
t = 1 - sigma exceeds it, and ``cfg_normalization`` k > 0 caps each guided output's norm at k
times the conditional one's (norms over the whole image, as over the whole latent there)."""

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

from l2p.adapters.base import SourceAdapter, check_rope_grid


class ZImageAdapter(SourceAdapter):
    source_class = "ZImageTransformer2DModel"
    block_groups = ("noise_refiner", "layers")
    embedding_arguments = ("prompt_embeds",)  # a list of (L, D), one per prompt, as ZImagePipeline takes
    output_modules = ("all_final_layer",)
    pixel_argument = "x"
    output_sign = -1
    flow_sigmas = True
    guidance_scale_offset = 1.0  # ZImagePipeline guides as cond + g (cond - uncond)
    guidance_options = {"cfg_truncation": 1.0, "cfg_normalization": False}

    def check_arguments(self, arguments, rows, cols, patch):
        check_rope_grid(self.source_class, self.config.get("axes_lens"), rows, cols, patch)

    @staticmethod
    def guides_step(step, num_steps, t, options):
        truncation = options["cfg_truncation"]
        if truncation is None or float(truncation) > 1:
            return True
        return (1000 - float(t)) / 1000 <= float(truncation)

    @staticmethod
    def guide(uncond, cond, scale, patch_size, options):
        guided = uncond + scale * (cond - uncond)
        cap = float(options["cfg_normalization"] or 0.0)
        if cap > 0:
            norm = torch.linalg.vector_norm
            limit = norm(cond, dim=(1, 2, 3), keepdim=True) * cap
            current = norm(guided, dim=(1, 2, 3), keepdim=True)
            guided = torch.where(current > limit, guided * (limit / current), guided)
        return guided

    @property
    def latent_patch(self) -> int:
        return int(self.config["all_patch_size"][0])

    @property
    def _key(self) -> str:
        # The source embeds/projects through the ModuleDict entry of the (patch, frame
        # patch) pair its forward is called with; the defaults are the first pair.
        return f"{self.latent_patch}-{int(self.config['all_f_patch_size'][0])}"

    @property
    def input_module(self) -> str:
        return f"all_x_embedder.{self._key}"

    @property
    def output_module(self) -> str:
        return f"all_final_layer.{self._key}.linear"

    @property
    def final_layer_module(self) -> str:
        return f"all_final_layer.{self._key}"

    def pixels_from_input(self, value):
        # The source takes a list of (C, 1, H, W); accept that form too.
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, torch.Tensor) and v.dim() in (3, 4) for v in value):
                raise ValueError("the pixel Z-Image takes x as a (B, 3, H, W) tensor or a list of (3, 1, H, W) / "
                                 "(3, H, W) images")
            frames = [v.squeeze(1) if v.dim() == 4 else v for v in value]
            if len({tuple(f.shape) for f in frames}) > 1:
                # The pixel model runs one token grid per call; the source's list takes any mix.
                raise ValueError(f"the pixel Z-Image takes images of one size per call, got "
                                 f"{sorted({tuple(f.shape) for f in frames})}; call it once per size")
            return torch.stack(frames)
        return value

    def dummy_latent(self, batch, rows, cols, dtype, device):
        p = self.latent_patch
        return [
            torch.zeros(self.latent_channels, 1, rows * p, cols * p, dtype=dtype, device=device)
            for _ in range(batch)
        ]

    def arrange_tokens(self, tokens, rows, cols, latent_input):
        # Each image's tokens padded (by repeating the last) to a multiple of SEQ_MULTI_OF
        # and concatenated, exactly as the source pads its patches before embedding.
        b, n, _ = tokens.shape
        pad = (-n) % SEQ_MULTI_OF
        if latent_input.shape[0] != b * (n + pad):
            raise ValueError(
                f"ZImageTransformer2DModel fed its embedder {latent_input.shape[0]} patches but "
                f"the pixels give {b} x {n} tokens ({rows}x{cols})"
            )
        if pad:
            tokens = torch.cat([tokens, tokens[:, -1:].expand(b, pad, tokens.shape[2])], dim=1)
        return tokens.reshape(b * (n + pad), tokens.shape[2])

    def image_tokens(self, captured, n_tokens, arguments):
        return captured[:, :n_tokens]

    def source_latent(self, latent):
        return [z.unsqueeze(1) for z in latent]  # one (C, 1, h, w) per image

    def block_input_tokens(self, group, hidden_states, n_tokens, arguments):
        # The image tokens lead both the noise refiner's (padded) sequence and the unified one.
        return hidden_states[:, :n_tokens]

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        embeds, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": list(embeds)}  # variable-length per caption

    @classmethod
    def conditioning_from_embeddings(cls, given):
        embeds = given.get("prompt_embeds")
        cls._refuse_unknown_embeddings(given)
        if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            embeds = list(embeds)  # a batch of equal lengths
        if not isinstance(embeds, (list, tuple)) or not embeds or not all(
                isinstance(e, torch.Tensor) and e.dim() == 2 for e in embeds):
            raise ValueError("prompt_embeds must be a list of (L, D) tensors, one per prompt, as ZImagePipeline "
                             f"takes them (or a (B, L, D) tensor), got {type(embeds).__name__}")
        return {"prompt_embeds": list(embeds)}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        return dict(x=x_t, t=(1000.0 - times) / 1000.0, cap_feats=list(cond["prompt_embeds"]))
