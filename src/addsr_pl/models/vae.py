"""The VAE as a codec between images in [0, 1] and scaled latents."""

from __future__ import annotations

from torch import Tensor, nn


class VaeCodec(nn.Module):
    """Encodes images in [0, 1] to latents times `scaling_factor` and decodes them back to [0, 1].

    Encoding takes the posterior mean, so the same image always gives the same latent.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD2's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: Tensor) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(images.to(dtype) * 2 - 1).latent_dist
        return posterior.mean * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(dtype) / self.scaling_factor).sample
        return (images.float() + 1) / 2
