"""Source-feature alignment (``align.weight > 0``): a loss term that pulls the hidden states
entering one block of the pixel model towards the source transformer's for the same image.

L2P freezes the middle blocks and counts on the trainable first blocks to carry pixel patches
into the source's feature space. In the toy migration they do not (cosine similarity 0.44-0.69
between the pixel model's and the source's hidden states entering the first frozen block, for
the same image), and adding 0.5 x this term to the loss raised the toy pixel model's score from
0.033 to 0.125 at 1500 steps, over three training seeds (python/l2p/toy/RESULTS.md).

Per micro-batch: the source's VAE encodes the clean images (``encode_latents``); each latent is
noised at its sample's time with its own noise, which the sample's seeded generator draws after
the pixel noise (so resumed and multi-process runs stay exact); an untouched copy of the
source transformer runs on them with the same conditioning and stops where the compared block
would begin. The term is 1 - cosine similarity along the feature axis, in fp32, averaged over
the image tokens and the batch.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from l2p.train.config import ConfigError
from l2p.train.source import encode_latents


def _hidden_states(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """A diffusers block's input hidden states: its first argument, however it is passed."""
    return args[0] if args else kwargs["hidden_states"]


class _Reached(Exception):
    """Ends the source forward at the compared block, with the hidden states entering it."""

    def __init__(self, hidden_states: torch.Tensor):
        super().__init__()
        self.hidden_states = hidden_states


class _StopHere(nn.Module):
    """Stands in the source copy for the compared block and every block after it: the
    forward never gets further, so their weights are not kept."""

    def forward(self, *args, **kwargs):
        raise _Reached(_hidden_states(args, kwargs))


def alignment_term(pixel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of (B, N, D) hidden states along D, in fp32, averaged over the
    N tokens and the B samples."""
    return 1.0 - torch.nn.functional.cosine_similarity(pixel.float(), source.float(), dim=-1).mean()


@functools.lru_cache(maxsize=8)
def low_frequency_basis(channels: int, factor: int, count: int) -> torch.Tensor:
    """The first ``count`` patterns of the orthonormal 2-D DCT-II basis of a (channels, factor,
    factor) block, lowest spatial frequency first (ordered by u + v, u, v, then channel):
    shape (count, channels, factor, factor), float64."""
    if not 0 < count <= channels * factor * factor:
        raise ValueError(f"a ({channels}, {factor}, {factor}) block has {channels * factor * factor} "
                         f"orthonormal patterns, not {count}")
    n = torch.arange(factor, dtype=torch.float64)
    dct = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / factor) * math.sqrt(2 / factor)
    dct[0] /= math.sqrt(2)
    order = sorted(itertools.product(range(factor), range(factor), range(channels)),
                   key=lambda uvc: (uvc[0] + uvc[1], *uvc))
    basis = torch.zeros(count, channels, factor, factor, dtype=torch.float64)
    for i, (u, v, c) in enumerate(order[:count]):
        basis[i, c] = torch.outer(dct[u], dct[v])
    return basis


def coupled_source_noise(pixel_noise: torch.Tensor, latent_channels: int, factor: int) -> torch.Tensor:
    """The source's latent noise as a function of one sample's pixel noise (align.noise=coupled):
    (C, H, W) -> (latent_channels, H / factor, W / factor), each latent cell the coefficients of
    its factor x factor pixel block on the block's ``latent_channels`` lowest-frequency patterns.
    The patterns are orthonormal, so standard normal pixel noise gives standard normal latent
    noise, independent across cells and channels, as the source was trained on; and the part of
    the pixel noise the latent grid can see is the part the source reacts to."""
    c, h, w = pixel_noise.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel noise of {h}x{w} does not split into {factor}x{factor} blocks")
    basis = low_frequency_basis(c, factor, latent_channels).to(pixel_noise.dtype)
    blocks = pixel_noise.reshape(c, h // factor, factor, w // factor, factor)
    return torch.einsum("kcij,cyixj->kyx", basis, blocks).contiguous()


class SourceAlignment:
    """The source side of the alignment term and the tap on the pixel model's side.

    Args:
        model: the pixel model (``PixelTransformer2DModel``), before any DDP/FSDP wrapping.
        transformer: an untouched copy of the source transformer; it is taken over: the
            compared block and the blocks after it are replaced by a stop, the rest frozen.
        vae: the source's VAE, without its decoder (``Source.load_vae_encoder``).
        block: the compared block's index in ``model.blocks()``.
        vae_scale_factor: the VAE's factor; the pixel patch must keep the source's token grid.
        noise: the source's latent noise, "independent" or "coupled" (align.noise).
    """

    def __init__(self, model: nn.Module, transformer: nn.Module, vae: nn.Module, block: int,
                 vae_scale_factor: int | None, noise: str = "independent"):
        adapter = model.adapter
        names = [name for name, _ in model.blocks()]
        if not 0 <= block < len(names):
            raise ConfigError(f"align.block={block} is out of range: {model.config.source_class} has "
                              f"{len(names)} blocks (0..{len(names) - 1} in model.trainable's order)")
        grid_patch = adapter.pixel_patch_size(vae_scale_factor)
        if model.config.patch_size != grid_patch:
            raise ConfigError(f"align compares the pixel model's tokens with the source's, one for one, so the "
                              f"pixel patch must keep the source's token grid: set model.patch_size=null "
                              f"({grid_patch} here), not {model.config.patch_size}")
        latent_factor = model.config.patch_size // adapter.latent_patch
        if noise == "coupled" and adapter.latent_channels > 3 * latent_factor ** 2:
            raise ConfigError(f"align.noise=coupled draws each latent cell's {adapter.latent_channels} noise "
                              f"channels from the {3 * latent_factor ** 2} pixel noise values of its "
                              f"{latent_factor}x{latent_factor} block, too few here: use align.noise=independent")
        order = [(group, i) for group in adapter.block_groups for i in range(len(transformer.get_submodule(group)))]
        for group, i in order[block:]:
            transformer.get_submodule(group)[i] = _StopHere()
        self.adapter = adapter
        self.group = order[block][0]
        self.block_name = names[block]
        self.pixel_block = model.blocks()[block][1]
        self.patch_size = model.config.patch_size
        self.latent_factor = latent_factor
        self.noise = noise
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)

    def to(self, device: torch.device, dtype: torch.dtype) -> "SourceAlignment":
        # from_pretrained(torch_dtype=...) leaves some transformers in fp32 (SD3, diffusers 0.42).
        self.transformer.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        return self

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The shape of one image's latent, the shape of its source noise."""
        return (self.adapter.latent_channels, height // self.latent_factor, width // self.latent_factor)

    def source_noise(self, pixel_noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One sample's latent noise: drawn from ``generator`` after its (3, H, W) pixel noise,
        or, coupled, computed from that pixel noise (coupled_source_noise)."""
        if self.noise == "coupled":
            return coupled_source_noise(pixel_noise, self.adapter.latent_channels, self.latent_factor)
        return torch.randn(self.latent_shape(*pixel_noise.shape[-2:]), generator=generator)

    @contextlib.contextmanager
    def pixel_block_input(self):
        """Within the block, a forward of the pixel model appends the hidden states entering
        the compared block to the yielded list (once per forward: a backward recomputing a
        checkpointed block runs its forward function, not the module call the hook sits on,
        and the hook is gone by then)."""
        captured: list[torch.Tensor] = []
        handle = self.pixel_block.register_forward_pre_hook(
            lambda module, args, kwargs: captured.append(_hidden_states(args, kwargs)), with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()

    @torch.no_grad()
    def source_block_input(self, x0: torch.Tensor, source_noise: torch.Tensor, times: torch.Tensor,
                           kwargs: Mapping[str, Any], objective, autocast: Callable) -> torch.Tensor:
        """The source transformer's hidden states entering the compared block, for the clean
        images ``x0`` noised in its latent space at ``times`` with ``source_noise``;
        ``kwargs``: the pixel model's call for the same micro-batch (its conditioning)."""
        z0 = encode_latents(self.vae, x0)
        if z0.shape != source_noise.shape:
            raise RuntimeError(f"the source VAE gives latents of shape {tuple(z0.shape)}, the source noise "
                               f"has {tuple(source_noise.shape)}")
        z_t, _ = objective.noisy_and_target(z0, source_noise.to(z0.device), times)
        call = dict(kwargs)
        call[self.adapter.pixel_argument] = self.adapter.source_latent(z_t)
        try:
            with autocast():
                self.transformer(**call, return_dict=False)
        except _Reached as reached:
            return reached.hidden_states
        raise RuntimeError(f"the source forward ended without reaching {self.block_name}")

    def term(self, pixel_hidden: torch.Tensor, source_hidden: torch.Tensor, x0: torch.Tensor,
             kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The alignment term of one micro-batch from both sides' hidden states entering the
        compared block (only the image tokens are compared)."""
        n_tokens = (x0.shape[-2] // self.patch_size) * (x0.shape[-1] // self.patch_size)
        pixel = self.adapter.block_input_tokens(self.group, pixel_hidden, n_tokens, kwargs)
        source = self.adapter.block_input_tokens(self.group, source_hidden, n_tokens, kwargs)
        return alignment_term(pixel, source)
