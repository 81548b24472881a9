"""Start the pixel patch embedding where the source's latent embedding is (``model.embed_init=vae``).

``convert_to_pixel`` gives the new pixel patch embedding nn.Conv2d's random initialisation, so
for its first hundreds of steps the transferred blocks see tokens unlike the ones they were
trained on. The source's own path from pixels to tokens is its VAE encoder followed by its
latent patch projection; over one token's patch the encoder is roughly linear, so

    latent patch  ~=  A @ pixel patch + c        (ridge regression over sample images)
    token         =   W_latent @ latent patch + b_latent
                  ~=  (W_latent @ A) @ pixel patch + (W_latent @ c + b_latent)

and the composition is a pixel patch embedding of the right shape that starts with the
source's tokens for clean images, up to what a linear map of each patch cannot capture.

The ridge term keeps A from amplifying pixel directions the clean images barely use (fine
detail): the model also sees noisy images, whose per-pixel noise a least-squares A with large
weights on those directions would blow up. On the toy (python/l2p/toy/RESULTS.md, section
"Starting the pixel embedding from the source's VAE") a ridge of 0.1 on pixels in [-1, 1]
explained 81% of the clean latents' variance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from l2p.ops import _checks


@dataclass
class EmbeddingFit:
    """What ``fit_pixel_embedding`` measured: over ``patches`` pixel/latent patch pairs, the
    share of the clean latents' variance the linear map explains."""

    patches: int
    ridge: float
    explained: float

    def __str__(self) -> str:
        return (f"pixel embedding fitted to the source's VAE + latent projection over {self.patches} patches "
                f"(ridge {self.ridge:g}): explains {100 * self.explained:.1f}% of the latent patches' variance")


def _patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/size * W/size, C * size * size), each row one patch in the
    (C, size, size) order of a Conv2d weight, patches row-major over the grid."""
    columns = F.unfold(images, kernel_size=size, stride=size)  # (B, C * size * size, patches)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


@torch.no_grad()
def fit_pixel_embedding(
    model: nn.Module,
    source_transformer: nn.Module,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_batches: Iterable[torch.Tensor],
    *,
    ridge: float = 0.1,
) -> EmbeddingFit:
    """Set ``model``'s pixel patch embedding to the source's latent projection composed with
    the ridge-regression fit of each latent patch on its pixel patch.

    Args:
        model: the converted pixel model (``PixelTransformer2DModel``); its pixel embedding
            is overwritten in place (same dtype and device).
        source_transformer: the source transformer it was converted from (read only).
        encode: clean images (B, 3, H, W) in [-1, 1] -> the latents the source transformer
            takes, (B, C, h, w) (``l2p.train.source.encode_latents`` with the source's VAE).
        image_batches: clean images (B, 3, H, W) in [-1, 1], e.g. the training corpus; the
            statistics are summed batch by batch in float64.
        ridge: added to the pixel patches' covariance (pixel units) before solving.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if not (hasattr(model, "adapter") and hasattr(model, "pixel_embed")):
        raise TypeError(f"model must be a pixel model (what l2p.convert_to_pixel returns), got "
                        f"{type(model).__name__}")
    adapter = model.adapter
    latent_weight, latent_bias = adapter.latent_patch_projection(source_transformer)
    d_model, channels, p, _ = latent_weight.shape
    pixel_patch = model.config.patch_size
    embed = model.pixel_embed
    sums = None
    for images in image_batches:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        # Else the latent grid check below blames the patch size for the image size.
        _checks.require_divisible(images.shape[2], images.shape[3], pixel_patch, what="image")
        latents = encode(images)
        rows, cols = images.shape[2] // pixel_patch, images.shape[3] // pixel_patch
        if tuple(latents.shape[1:]) != (channels, rows * p, cols * p):
            raise ValueError(
                f"the encoder gave latents {tuple(latents.shape)} for {tuple(images.shape)} images, but a "
                f"{rows}x{cols} token grid of {p}x{p} latent patches with {channels} channels was expected: "
                f"the pixel patch ({pixel_patch}) must keep the source's token grid (model.patch_size=null)")
        x = _patches(images.double().cpu(), pixel_patch)
        z = _patches(latents.double().cpu(), p)
        if sums is None:
            sums = {"n": 0, "x": x.new_zeros(x.shape[1]), "z": z.new_zeros(z.shape[1]),
                    "xx": x.new_zeros(x.shape[1], x.shape[1]), "zx": z.new_zeros(z.shape[1], x.shape[1]),
                    "zz": z.new_zeros(())}
        sums["n"] += x.shape[0]
        sums["x"] += x.sum(0)
        sums["z"] += z.sum(0)
        sums["xx"] += x.T @ x
        sums["zx"] += z.T @ x
        sums["zz"] += (z * z).sum()
    if sums is None:
        raise ValueError("fit_pixel_embedding needs at least one batch of images")
    n = sums["n"]
    mean_x, mean_z = sums["x"] / n, sums["z"] / n
    cov_xx = sums["xx"] / n - torch.outer(mean_x, mean_x)
    cov_zx = sums["zx"] / n - torch.outer(mean_z, mean_x)
    eye = torch.eye(cov_xx.shape[0], dtype=cov_xx.dtype)
    # A = cov_zx (cov_xx + ridge I)^-1, solved as a linear system (symmetric positive definite).
    pixel_to_latent = torch.linalg.solve(cov_xx + ridge * eye, cov_zx.T).T
    offset = mean_z - pixel_to_latent @ mean_x
    # Variance explained: total latent variance minus the fit's residual, both per patch.
    total = sums["zz"] / n - mean_z @ mean_z
    fitted = torch.einsum("ij,jk,ik->", pixel_to_latent, cov_xx, pixel_to_latent)
    residual = total - 2 * torch.einsum("ij,ij->", pixel_to_latent, cov_zx) + fitted
    explained = float(1 - residual / total) if total > 0 else 0.0

    w_latent = latent_weight.detach().double().cpu().reshape(d_model, -1)
    weight = (w_latent @ pixel_to_latent).reshape(embed.weight.shape)
    bias = w_latent @ offset
    if latent_bias is not None:
        bias = bias + latent_bias.detach().double().cpu()
    embed.weight.copy_(weight.to(embed.weight.dtype))
    if embed.bias is not None:  # (a source projection without a bias: the constant offset is dropped)
        embed.bias.copy_(bias.to(embed.bias.dtype))
    return EmbeddingFit(patches=n, ridge=float(ridge), explained=explained)
