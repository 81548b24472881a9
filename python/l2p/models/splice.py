"""The two modules spliced into a source transformer so that its own forward (position
ids, RoPE, conditioning, packing) runs unchanged on pixels.

The pixel model hands the source forward a zero latent of the shape the source expects;
``PixelInput`` sits where the latent projection was, ignores that latent and embeds the
pixels stashed for the call; ``FeatureTap`` sits where the final projection was, keeps the
last-layer token features (after the source's final norm and modulation) and returns zeros
of the shape the source goes on to unpatchify.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from l2p.models.pixel_embed import PixelPatchEmbed

# (tokens (B, N, D), rows, cols, what the source fed the replaced module) -> what the
# replaced module must return.
Arrange = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


class PixelInput(PixelPatchEmbed):
    """A ``PixelPatchEmbed`` in the place of a latent input projection."""

    def __init__(self, patch_size: int, embed_dim: int, bias: bool, arrange: Arrange):
        super().__init__(patch_size, embed_dim, in_channels=3, bias=bias)
        self._arrange = arrange
        self.pending: torch.Tensor | None = None

    def forward(self, latent_input: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            raise RuntimeError(
                "this transformer was converted to pixel space; call the pixel model "
                "(PixelTransformer2DModel), not its .transformer"
            )
        pixels = self.pending
        rows, cols = pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size
        return self._arrange(self.embed(pixels), rows, cols, latent_input)


class FeatureTap(nn.Module):
    """Keeps the features that would have entered the final projection."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.captured: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.captured = features
        return features.new_zeros(*features.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features} (zeros; features go to the pixel head)"


class BlockFeatureTap(FeatureTap):
    """A ``FeatureTap`` in the place of a whole final layer (norm, modulation, projection),
    called as the source calls that layer: keeps the last block's output, its first argument."""

    def forward(self, features: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward(features)
