"""The pixel-space model: a latent diffusers transformer with pixels in and pixels out."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from l2p.adapters import get_adapter
from l2p.models.heads import build_head, complete_head_config
from l2p.models.splice import BlockFeatureTap, FeatureTap, PixelInput
from l2p.ops import _checks


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


class PixelTransformer2DModel(ModelMixin, ConfigMixin):
    """A diffusers transformer converted to pixel space (L2P).

    ``transformer`` is the source model, built from its own config, with its latent input
    projection replaced by a pixel patch embedding and its final projection by a tap that
    hands the last-layer token features to ``head`` (the Detailer Head by default).

    The forward takes the source model's forward arguments, except that the noisy input is
    an image (B, 3, H, W) for every family, and returns (B, 3, H, W) in the source's
    prediction convention and sign (``prediction``, ``output_sign``), so the source
    scheduler and pipeline logic work unchanged: like ZImageTransformer2DModel, the pixel
    Z-Image returns the negative velocity and the sampler negates it; the head itself
    always learns output_sign * (model output), i.e. the scheduler's model output.

    Args (all recorded in config.json, so ``from_pretrained`` rebuilds it exactly):
        source_class: the diffusers class name of the source transformer.
        source_config: the source transformer's full config.
        patch_size: the pixel patch P (latent patch x a power of two).
        head_config: the head config, e.g.
            ``{"type": "detailer", "channels": [64, 128, 256, 512]}`` or ``{"type": "linear"}``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        source_class: str,
        source_config: dict[str, Any],
        patch_size: int,
        head_config: dict[str, Any],
    ):
        super().__init__()
        adapter = get_adapter(source_class, source_config)
        adapter.pixel_patch_size(patch_size=patch_size)
        self.adapter = adapter
        self.transformer = adapter.source_type().from_config(dict(source_config))
        adapter.prepare_source(self.transformer)
        latent_in = self.transformer.get_submodule(adapter.input_module)
        latent_out = self.transformer.get_submodule(adapter.output_module)
        token_dim = latent_in.weight.shape[0]
        has_bias = latent_in.bias is not None
        pixel_in = PixelInput(patch_size, token_dim, has_bias, adapter.arrange_tokens)
        _replace(self.transformer, adapter.input_module, pixel_in)
        head_config = complete_head_config(head_config, patch_size)
        if head_config.get("features") == "blocks":
            # The head reads the last block's output: the source's whole final layer (norm,
            # modulation, projection) gives way to the tap.
            if adapter.final_layer_module is None:
                raise ValueError(f"head features 'blocks' is not available for {source_class} (l2p knows "
                                 f"where its final layer starts only for ZImageTransformer2DModel); use "
                                 f"the default features")
            self._tap_module = adapter.final_layer_module
            _replace(self.transformer, self._tap_module, BlockFeatureTap(latent_out.weight.shape[0]))
        else:
            self._tap_module = adapter.output_module
            _replace(self.transformer, self._tap_module, FeatureTap(latent_out.weight.shape[0]))
        self.head = build_head(head_config, token_dim=token_dim, patch_size=patch_size)
        self._source_signature = inspect.signature(self.transformer.forward)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``ModelMixin.from_pretrained``, with every weight in ``torch_dtype``
        (or ``dtype``) when one is given, and without one a folder that mixes dtypes (a merged
        float32 delta over a bf16 base; a published L2P checkpoint) in the widest of them.

        Without accelerate, diffusers loads by assigning the file's tensors in place of the
        model's whenever the first entry of the model's state dict already has the file's
        dtype; for SD3 that entry is the float32 position table, so a float32 file loaded
        with torch_dtype=torch.bfloat16 kept every weight in float32. The cast below is what
        diffusers' accelerate path does to each tensor it loads (l2p.models.loading)."""
        from l2p.models.loading import cast_loaded, one_dtype

        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if dtype is None:
            one_dtype(model)  # a folder of mixed dtypes runs in the widest
        else:
            cast_loaded(model, dtype)
        return loaded

    # -- what the source pipeline needs to know ------------------------------------------
    @property
    def prediction(self) -> str:
        """"flow" (velocity eps - x0) or "epsilon", as the source scheduler reads it."""
        return self.adapter.prediction

    @property
    def output_sign(self) -> int:
        """-1 where the source pipeline negates the transformer output (Z-Image, Lumina2)."""
        return self.adapter.output_sign

    @property
    def pixel_embed(self) -> PixelInput:
        return self.transformer.get_submodule(self.adapter.input_module)

    def enable_head_tiling(self, tile_size: int | None = None) -> None:
        """Run the Detailer Head in tiles of ``tile_size`` pixels (a multiple of the patch
        size; None: chosen from the free memory at each call) with an exact halo, so the
        output is unchanged and the head's memory is bounded by the tile (like diffusers'
        ``vae.enable_tiling``). See ``l2p.sample.tiling``."""
        if not hasattr(self.head, "enable_tiling"):
            raise ValueError(f"the {type(self.head).__name__} is per-token and needs no tiling")
        self.head.enable_tiling(tile_size)

    def disable_head_tiling(self) -> None:
        if hasattr(self.head, "disable_tiling"):
            self.head.disable_tiling()

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The ordered block sequence ``set_trainable`` counts from both ends."""
        out = []
        for group in self.adapter.block_groups:
            for i, block in enumerate(self.transformer.get_submodule(group)):
                out.append((f"transformer.{group}.{i}", block))
        return out

    def forward(self, hidden_states: Any = None, *args, return_dict: bool = True, **kwargs):
        """``hidden_states``: the noisy image (B, 3, H, W), H and W multiples of
        ``config.patch_size`` (Z-Image also takes its list form, as ``x``); every other
        argument is the source forward's (timestep, text embeddings, FLUX ``img_ids``,
        Qwen ``img_shapes``, ...) for the token grid (H/P, W/P). Returns (B, 3, H, W) as
        ``Transformer2DModelOutput`` or a 1-tuple."""
        if hidden_states is None:
            hidden_states = kwargs.pop(self.adapter.pixel_argument, None)
        pixels = self.adapter.pixels_from_input(hidden_states)
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(
                f"the pixel model takes the noisy image as (B, 3, H, W) in place of the latent; "
                f"got {got}"
            )
        p = self.config.patch_size
        _checks.require_divisible(pixels.shape[2], pixels.shape[3], p, what="pixel image")
        batch, rows, cols = pixels.shape[0], pixels.shape[2] // p, pixels.shape[3] // p
        latent = self.adapter.dummy_latent(batch, rows, cols, pixels.dtype, pixels.device)
        try:
            bound = self._source_signature.bind(latent, *args, return_dict=False, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.config.source_class} forward arguments: {exc}") from None
        self.adapter.check_arguments(bound.arguments, rows, cols, p)

        pixel_in, tap = self.pixel_embed, self.transformer.get_submodule(self._tap_module)
        pixel_in.pending = pixels
        try:
            self.transformer(*bound.args, **bound.kwargs)
            features = tap.captured
        finally:
            pixel_in.pending = None
            tap.captured = None
        tokens = self.adapter.image_tokens(features, rows * cols, bound.arguments)
        image = self.head(pixels, tokens)
        if self.adapter.output_sign < 0:
            image = -image
        if not return_dict:
            return (image,)
        return Transformer2DModelOutput(sample=image)
