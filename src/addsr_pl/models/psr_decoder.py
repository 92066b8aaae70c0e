"""A small decoder for PSR's intermediate x0s (diffusers' `AutoencoderTiny`, the TAESD layout).

In a k-step PSR call the x0s of steps 1 .. k-1 are decoded only to build the next step's control
image; with SD2's VAE those decodes are most of the call's FLOPs. `PsrDecoder` decodes them with an
`AutoencoderTiny` instead (the last step's image still comes from the full VAE). A public TAESD folder
(`config.json` + `diffusion_pytorch_model.safetensors`) loads as it is; `stage=psr_decoder` distils
one from the project's own VAE (`method/psr_decoder.py`).

TAESD's decoder reads the latents the UNet works in (the VAE's latents times its scaling factor),
so `decode` takes the same latents as `VaeCodec.decode` and also returns images in [0, 1].
"""

from __future__ import annotations

import math

from diffusers import AutoencoderTiny
from torch import Tensor, nn


def build_tiny_autoencoder(
    scale_factor: int, latent_channels: int, channels: int, blocks_per_stage: int
) -> AutoencoderTiny:
    """A fresh AutoencoderTiny for a VAE of `scale_factor` pixels per latent cell: log2(scale_factor)
    upsampling stages of `blocks_per_stage` blocks, `channels` wide, plus TAESD's single-block output
    stage (the encoder mirrors it, as in TAESD, and stays unused)."""
    stages = math.log2(scale_factor)
    if scale_factor < 1 or stages != int(stages):
        raise ValueError(f"PSR decoder: the VAE's scale factor {scale_factor} must be a power of two")
    stages = int(stages)
    return AutoencoderTiny(
        encoder_block_out_channels=(channels,) * (stages + 1),
        decoder_block_out_channels=(channels,) * (stages + 1),
        num_encoder_blocks=(1,) + (blocks_per_stage,) * stages,
        num_decoder_blocks=(blocks_per_stage,) * stages + (1,),
        latent_channels=latent_channels,
        scaling_factor=1.0,
    )


class PsrDecoder(nn.Module):
    """Scaled latents -> images in [0, 1] through an AutoencoderTiny's decoder (the VaeCodec interface)."""

    def __init__(self, autoencoder: AutoencoderTiny):
        super().__init__()
        self.autoencoder = autoencoder

    @property
    def scale_factor(self) -> int:
        return self.autoencoder.config.upsampling_scaling_factor ** (
            len(self.autoencoder.config.decoder_block_out_channels) - 1
        )

    def decode(self, latents: Tensor) -> Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        scaling = self.autoencoder.config.scaling_factor
        images = self.autoencoder.decoder(latents.to(dtype) / scaling)
        return (images.float() + 1) / 2

    def forward(self, latents: Tensor) -> Tensor:
        return self.decode(latents)
