"""The VAE as a codec between images in [0, 1] and scaled latents, and a lossless codec of SD's shape."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor, nn

from addsr_pl.core.precision import autocast_off


class PixelUnshuffleCodec(ModelMixin, ConfigMixin):
    """A lossless stand-in for SD's VAE with the same geometry: each `factor` x `factor` block of pixels
    becomes `in_channels * factor**2` latent channels (pixel unshuffle), and decoding puts them back.

    It has no weights. A tiny model decoded by a small fitted VAE cannot get past that VAE's own
    reconstruction error; this codec has none, so what a tiny teacher or student learns shows in full
    (the demo's codec). It answers `encode(x).latent_dist` and `decode(z).sample` like `AutoencoderKL`.
    """

    lossless = True

    @register_to_config
    def __init__(self, in_channels: int = 3, factor: int = 8, scaling_factor: float = 1.0,
                 shift_factor: float | None = None):  # fmt: skip
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"PixelUnshuffleCodec factor = {factor}: must be a power of 2 (8 as SD's VAE).")
        self.encoder = nn.PixelUnshuffle(factor)
        self.decoder = nn.PixelShuffle(factor)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor**2

    def encode(self, x: Tensor, return_dict: bool = True):
        latents = self.encoder(x)
        # a posterior of zero variance: its mean, mode and samples are the latent itself
        posterior = DiagonalGaussianDistribution(
            torch.cat([latents, torch.zeros_like(latents)], 1), deterministic=True
        )
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: Tensor, return_dict: bool = True):
        images = self.decoder(z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x).latent_dist.mean).sample

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Its folder holds only `config.json` (there are no weights to load)."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config)


class VaeCodec(nn.Module):
    """Encodes images in [0, 1] to (latents - `shift_factor`) x `scaling_factor` and decodes them back.

    Encoding takes the posterior mean, so the same image always gives the same latent. `shift_factor`
    is diffusers' key (SD3's VAE has one; SD2's is null, which means 0).
    """

    def __init__(self, vae: nn.Module, outside_autocast: bool = False):
        super().__init__()
        self.vae = vae
        # encode and decode in the weights' dtype with autocast off (`method.memory.vae_outside_autocast`)
        self.outside_autocast = outside_autocast

    @property
    def lossless(self) -> bool:
        """True for a codec that reproduces every image exactly (no VAE tiling is ever needed)."""
        return bool(getattr(self.vae, "lossless", False))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.latent_channels if self.lossless else self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD2's VAE)."""
        if self.lossless:
            return int(self.vae.config.factor)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _dtype(self, images: Tensor) -> torch.dtype:
        weight = next(self.vae.parameters(), None)
        return weight.dtype if weight is not None else images.dtype

    def encode(self, images: Tensor, posterior_noise: Tensor | None = None) -> Tensor:
        """Scaled latents of images in [0, 1]: the posterior's mean, or with `posterior_noise` (standard
        normal, latent-shaped) the sample mean + std * noise, as the official pipeline encodes."""
        with self._autocast(images):
            posterior = self.vae.encode(images.to(self._dtype(images)) * 2 - 1).latent_dist
        latent = posterior.mean
        if posterior_noise is not None:
            if self.lossless:
                raise ValueError("start_latent = 'sample' needs a VAE; this student's codec is lossless")
            latent = latent + posterior.std * posterior_noise.to(latent.dtype)
        return (latent - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        with self._autocast(latents):
            images = self.vae.decode(
                latents.to(self._dtype(latents)) / self.scaling_factor + self.shift_factor
            ).sample
        return (images.float() + 1) / 2

    def _autocast(self, inputs: Tensor):
        """Autocast off where `outside_autocast` (else left as the caller has it)."""
        return autocast_off(inputs.device.type) if self.outside_autocast else nullcontext()
