"""l2p: latent-to-pixel transfer.

Turns a pretrained latent diffusion transformer (diffusers) into a pixel-space generator:
the VAE is dropped, pixels enter through large patches so the token grid is unchanged, a
light conv U-Net (the Detailer Head) replaces the output layer, and only the input
embedding, the first and last blocks and the head are trained.
"""

__version__ = "0.1.0"

from l2p import ops  # noqa: E402

__all__ = ["__version__", "ops"]
