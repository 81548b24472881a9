"""What L2P needs to know about one diffusers transformer family.

An adapter names, by dotted module path inside the source model, the latent input
projection that the pixel embedding replaces, the final projection that the head replaces,
the ordered "blocks" that ``set_trainable`` counts from both ends, and the final norm /
modulation modules that are trained with the head. It also knows the latent layout (so the
source forward can be handed a zero latent with exactly the pixel token grid), how the
replaced input projection must return the pixel tokens, where the image tokens sit in the
last-layer features, and the prediction convention and sign the source pipeline expects.
Everything not named here (timestep, text and caption embedders, position tables, middle
blocks) is shared conditioning and stays frozen under "first_last:N".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import diffusers
import torch
from torch import nn


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_rope_grid(source_class: str, axes_lens, rows: int, cols: int, patch: int) -> None:
    """Refuse a token grid beyond the rows and columns of a precomputed rotary table
    (``axes_lens``: caption/frame, row, column lengths, as Lumina2 and Z-Image keep them): the
    source would index past the table, an IndexError about tensor sizes on the CPU and a
    device-side assert on CUDA."""
    if axes_lens is None:  # a config without the table's lengths: nothing to check against
        return
    max_rows, max_cols = int(axes_lens[1]), int(axes_lens[2])
    if rows > max_rows or cols > max_cols:
        raise ValueError(
            f"{rows * patch}x{cols * patch} px is beyond this {source_class}'s rotary position table: at "
            f"most {max_rows * patch} px high and {max_cols * patch} px wide at pixel patch {patch} "
            f"({max_rows}x{max_cols} tokens, axes_lens); sample smaller, or convert with a larger --patch-size"
        )


def encode_prompt_with_mask(pipe, prompts: list[str], device) -> dict[str, Any]:
    """Text conditioning of the pipelines whose encode_prompt returns (embeddings, mask,
    negative embeddings, negative mask), called with its defaults: PixArt, Lumina2."""
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def without_text_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption embeddings (B, L, C) and mask (B, L) without the trailing positions that no
    sample's mask keeps.

    PixArt and Sana pad every caption to the text encoder's length (300 tokens for
    PixArt-Sigma) and turn the mask into an additive -10000 on the padded keys, whose softmax
    weight is exactly zero: those keys change nothing, yet cost every image token
    cross-attention and the caption projection. A batch in which some caption keeps no
    position at all is returned as it is (that sample attends uniformly to its padding)."""
    if mask.dim() != 2 or embeds.dim() != 3 or embeds.shape[:2] != mask.shape:
        return embeds, mask
    kept = mask.detach().to("cpu", torch.bool)  # one device-to-host copy of B x L flags
    if kept.shape[1] == 0 or not bool(kept.any(dim=1).all()):
        return embeds, mask
    length = int(kept.any(dim=0).nonzero()[-1]) + 1
    return embeds[:, :length], mask[:, :length]


class SourceAdapter:
    source_class: ClassVar[str]
    input_module: ClassVar[str]
    output_module: ClassVar[str]
    block_groups: ClassVar[tuple[str, ...]]
    output_modules: ClassVar[tuple[str, ...]] = ()
    # The module that takes the last block's output first (the final norm, modulation and
    # projection), where a head with features "blocks" reads; None where not mapped.
    final_layer_module: ClassVar[str | None] = None
    # Name of the source forward's first (noisy latent) argument.
    pixel_argument: ClassVar[str] = "hidden_states"
    # "epsilon" or "flow" (velocity eps - x0), as the source scheduler reads the output.
    prediction: ClassVar[str] = "flow"
    # The source transformer returns output_sign * (scheduler's model output); the pixel
    # model keeps that sign, so the source pipeline's own negation still applies.
    output_sign: ClassVar[int] = 1
    vae_scale_factor: ClassVar[int] = 8

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)

    # -- text conditioning and the source pipeline's calling convention ---------------------
    # (shared by the trainer and the sampler; a family without them converts but does not
    # train or sample yet)
    # The pipeline passes sigmas = linspace(1, 1/N, N) to set_timesteps (FLUX, Lumina2,
    # Qwen-Image, Z-Image) instead of letting the scheduler space them.
    flow_sigmas: ClassVar[bool] = False
    # calculate_shift's max_shift default in the pipeline, where the scheduler config is silent.
    max_shift: ClassVar[float] = 1.15
    # guidance_scale feeds a guidance embedding (where the transformer has one); classifier-free
    # guidance is then true_cfg_scale, as in FluxPipeline and QwenImagePipeline.
    distilled_guidance: ClassVar[bool] = False
    # Added to guidance_scale to get the weight w of uncond + w (cond - uncond): 1 where the
    # pipeline guides as cond + g (cond - uncond) (Z-Image; guidance is then on for any g > 0).
    guidance_scale_offset: ClassVar[float] = 0.0
    # How the pipeline encodes negative prompts, where not as encode_prompts does (None).
    encode_negative_prompts: ClassVar[Any] = None
    # The source pipeline's arguments for text conditioning encoded beforehand (prompt_embeds,
    # ..., without the negative_ prefix), which encode_prompts returns under the same names;
    # () where the pipeline takes none (DiT: class labels).
    embedding_arguments: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def has_conditioning(cls) -> bool:
        return cls.encode_prompts is not SourceAdapter.encode_prompts

    @staticmethod
    def encode_prompts(pipe, prompts: list[str], device) -> dict[str, Any]:
        """Captions -> named tensors (batch-first, or per-caption lists), by the source
        pipeline's own ``encode_prompt``; the names are those the embedding cache stores."""
        raise NotImplementedError

    @classmethod
    def _refuse_unknown_embeddings(cls, given: dict[str, Any]) -> None:
        unknown = sorted(set(given) - set(cls.embedding_arguments))
        if unknown:
            raise ValueError(f"the {cls.source_class} pipeline's precomputed conditioning is "
                             f"{', '.join(cls.embedding_arguments)} (negative_ ones alike); it takes no "
                             f"{', '.join(unknown)}")

    @classmethod
    def conditioning_from_embeddings(cls, given: dict[str, Any]) -> dict[str, Any]:
        """What ``encode_prompts`` returns, from the source pipeline's own precomputed
        arguments (``given``: ``embedding_arguments`` by name, batch-first tensors)."""
        names = ", ".join(cls.embedding_arguments)
        cls._refuse_unknown_embeddings(given)
        missing = [name for name in cls.embedding_arguments if given.get(name) is None]
        if missing:
            raise ValueError(f"the {cls.source_class} pipeline's precomputed conditioning is {names} (negative_ "
                             f"ones alike); missing {', '.join(missing)}")
        batch = None
        for name in cls.embedding_arguments:
            value, rank = given[name], 3 if name == "prompt_embeds" else 2
            if not isinstance(value, torch.Tensor) or value.dim() != rank:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of {rank} dims (batch first), got {got}")
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"{names} must have one row per prompt: batch sizes "
                                 f"{[tuple(given[n].shape) for n in cls.embedding_arguments]}")
            batch = value.shape[0]
        length = given["prompt_embeds"].shape[1]
        for name in cls.embedding_arguments:
            if name.endswith("mask") and given[name].shape[1] != length:
                raise ValueError(f"{name} {tuple(given[name].shape)} must have one entry per token of "
                                 f"prompt_embeds {tuple(given['prompt_embeds'].shape)}")
        return {name: given[name] for name in cls.embedding_arguments}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance) -> dict[str, Any]:
        """The transformer's keyword arguments (the noisy image included) for the scheduler's
        ``times`` (sigma x 1000 for flow sources, integer steps for DDPM ones), rescaled as the
        family's pipeline does."""
        raise NotImplementedError

    # The family pipeline's own guidance options (name -> that pipeline's default), which
    # L2PPipeline's call takes by the same names: e.g. Lumina2's cfg_trunc_ratio.
    guidance_options: ClassVar[Mapping[str, Any]] = {}

    @staticmethod
    def guides_step(step: int, num_steps: int, t: torch.Tensor, options: Mapping[str, Any]) -> bool:
        """Whether classifier-free guidance runs at denoising step ``step`` (0-based) of
        ``num_steps`` at scheduler time ``t``; a pipeline that truncates guidance says no for
        its late steps, which then run the conditional branch alone."""
        return True

    @staticmethod
    def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, patch_size: int,
              options: Mapping[str, Any]) -> torch.Tensor:
        """Classifier-free guidance of the model outputs (B, 3, H, W) as the pipeline combines
        them: uncond + scale (cond - uncond)."""
        return uncond + scale * (cond - uncond)

    def prepare_source(self, transformer: torch.nn.Module) -> None:
        """Adjust the source transformer inside the pixel model (once, when it is built)."""

    # -- latent layout -------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def latent_patch(self) -> int:
        return int(self.config["patch_size"])

    def source_type(self) -> type:
        return getattr(diffusers, self.source_class)

    def pixel_patch_size(
        self, vae_scale_factor: int | None = None, patch_size: int | None = None
    ) -> int:
        """The pixel patch: latent patch x VAE factor by default (the latent token grid),
        or ``patch_size``, which must be the latent patch times a power of two."""
        lp = self.latent_patch
        if patch_size is None:
            factor = self.vae_scale_factor if vae_scale_factor is None else vae_scale_factor
            valid = isinstance(factor, int) and not isinstance(factor, bool)
            if not valid or not _power_of_two(factor) or factor < 2:
                raise ValueError(
                    f"vae_scale_factor must be a power of two >= 2 (8 for SD/SD3/FLUX, 32 for "
                    f"Sana's DC-AE), got {factor!r}"
                )
            return lp * factor
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if patch_size % lp or not _power_of_two(patch_size // lp) or patch_size // lp < 2:
            choices = ", ".join(str(lp * 2**k) for k in range(1, 8))
            raise ValueError(
                f"patch_size {patch_size} is not the latent patch ({lp}) times a power of two "
                f">= 2; {self.source_class} takes one of {choices}, ... "
                f"(default {lp * self.vae_scale_factor} keeps the latent token grid)"
            )
        return patch_size

    def latent_patch_projection(self, transformer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The source's input projection as a weight over one token's latent patch, in a Conv2d
        weight's (D, C, p, p) layout, and its bias (``model.embed_init=vae``). Here a Linear
        over patches flattened channels last, (p, p, C), as Lumina2 and Z-Image patchify."""
        linear = transformer.get_submodule(self.input_module)
        p = self.latent_patch
        weight = linear.weight.reshape(linear.weight.shape[0], p, p, self.latent_channels)
        return weight.permute(0, 3, 1, 2), linear.bias

    # -- the call ------------------------------------------------------------------------
    def pixels_from_input(self, value: Any) -> Any:
        """The noisy image as the caller passed it, normalised to (B, 3, H, W)."""
        return value

    def dummy_latent(self, batch: int, rows: int, cols: int, dtype, device) -> Any:
        """A zero latent with the token grid (rows, cols), in the form the source takes."""
        p = self.latent_patch
        return torch.zeros(batch, self.latent_channels, rows * p, cols * p, dtype=dtype, device=device)

    def check_arguments(self, arguments: Mapping[str, Any], rows: int, cols: int, patch: int) -> None:
        """Reject caller arguments that describe another token grid, or a grid (rows x cols
        tokens of ``patch`` pixels) the source cannot take, before the source forward runs."""

    def arrange_tokens(
        self, tokens: torch.Tensor, rows: int, cols: int, latent_input: torch.Tensor
    ) -> torch.Tensor:
        """What the replaced input projection returns: here (B, N, D) for a Linear on
        packed latent tokens."""
        expected = (tokens.shape[0], tokens.shape[1])
        if tuple(latent_input.shape[:2]) != expected:
            raise ValueError(
                f"{self.source_class} fed its input projection {tuple(latent_input.shape)} "
                f"but the pixels give {expected[0]} x {expected[1]} tokens ({rows}x{cols}); "
                f"the pixel grid and the latent grid must match"
            )
        return tokens

    def image_tokens(
        self, captured: torch.Tensor, n_tokens: int, arguments: Mapping[str, Any]
    ) -> torch.Tensor:
        """The image tokens (B, N, D) of the last-layer features the final projection got."""
        if captured.shape[1] != n_tokens:
            raise RuntimeError(
                f"{self.source_class} produced {captured.shape[1]} output tokens, expected "
                f"{n_tokens}"
            )
        return captured

    # -- the source itself, beside the pixel model (the trainer's align term) ----------------
    def source_latent(self, latent: torch.Tensor) -> Any:
        """A latent (B, C, h, w), as the VAE gives it, in the form the source forward takes
        in the argument ``pixel_argument``."""
        return latent

    def block_input_tokens(
        self, group: str, hidden_states: torch.Tensor, n_tokens: int, arguments: Mapping[str, Any]
    ) -> torch.Tensor:
        """The image tokens (B, N, D) of the hidden states entering a block of ``group``
        (one of ``block_groups``); ``arguments``: the transformer's call arguments. Here the
        blocks see the image tokens alone (text tokens, where any, travel separately)."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != n_tokens:
            raise RuntimeError(
                f"the {group} blocks of {self.source_class} take hidden states of shape "
                f"{tuple(hidden_states.shape)}, not the {n_tokens} image tokens expected"
            )
        return hidden_states


class PatchEmbedAdapter(SourceAdapter):
    """Families whose input is a diffusers ``PatchEmbed``: its Conv2d ``proj`` is replaced
    and must return a (B, D, rows, cols) map, which PatchEmbed flattens (no copy) and to
    which it adds its own position table."""

    def arrange_tokens(self, tokens, rows, cols, latent_input):
        p = self.latent_patch
        grid = (latent_input.shape[-2] // p, latent_input.shape[-1] // p)
        if grid != (rows, cols) or latent_input.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"{self.source_class} fed its patch embedding a latent of shape "
                f"{tuple(latent_input.shape)} (grid {grid[0]}x{grid[1]}) but the pixels give "
                f"a {rows}x{cols} grid"
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)

    def latent_patch_projection(self, transformer):
        conv = transformer.get_submodule(self.input_module)  # already (D, C, p, p)
        return conv.weight, conv.bias


class PackedLatentAdapter(SourceAdapter):
    """Families fed packed latent tokens (B, N, 4*C): each token folds a 2x2 block of the
    latent (FLUX, Qwen-Image); a Linear embeds them."""

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"]) // 4

    def dummy_latent(self, batch, rows, cols, dtype, device):
        channels = int(self.config["in_channels"])
        return torch.zeros(batch, rows * cols, channels, dtype=dtype, device=device)

    def source_latent(self, latent):
        # The pipelines' _pack_latents: each token is a 2x2 block of the latent, channels first.
        b, c, h, w = latent.shape
        q = self.latent_patch
        tokens = latent.reshape(b, c, h // q, q, w // q, q).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(b, (h // q) * (w // q), c * q * q)

    def latent_patch_projection(self, transformer):
        # A Linear over the packed tokens above: (C, q, q), channels first.
        linear = transformer.get_submodule(self.input_module)
        q = self.latent_patch
        return linear.weight.reshape(linear.weight.shape[0], self.latent_channels, q, q), linear.bias
