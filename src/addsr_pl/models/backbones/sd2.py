"""Stable Diffusion 2 and SeeSR: UNet + ControlNet (pixel control), one CLIP text encoder, DDPM (the paper's)."""

from __future__ import annotations

from typing import Any

from torch import nn

from addsr_pl.core.noise_schedule import NoiseSchedule, noise_schedule_from
from addsr_pl.core.sampler import Denoiser
from addsr_pl.models.backbones import Backbone
from addsr_pl.models.conditioning import Conditioner
from addsr_pl.models.trainable import official_modules


class SD2Backbone(Backbone):
    name = "sd2"
    networks = ("unet", "controlnet")

    def noise_schedule(self, parts: dict[str, Any], stage: str) -> NoiseSchedule:
        return noise_schedule_from(parts["scheduler"], stage)

    def denoiser(
        self, networks: dict[str, nn.Module], codec: nn.Module, conditioning_scale: float
    ) -> Denoiser:
        # the control enters as pixels (the ControlNet's own embedding): the codec is not needed
        return Denoiser(networks["unet"], networks["controlnet"], conditioning_scale)

    def conditioner(self, parts: dict[str, Any], conditioning: dict, resolve=None) -> Conditioner:
        if conditioning.get("representation_in_context"):
            raise ValueError(
                "conditioning.representation_in_context = true is for backbones without image cross-attention "
                "(SD3); SD2 takes the representation through SeeSR's (model=sd2_seesr or tiny_seesr)"
            )
        return Conditioner.from_config(
            parts["text_encoder"], parts["tokenizer"], parts["unet"], conditioning, resolve
        )

    def trained_modules(self, networks: dict[str, nn.Module], trainable: str) -> list[nn.Module]:
        if trainable == "official":
            return official_modules(networks["unet"], networks["controlnet"])
        return [networks["controlnet"]] if trainable == "controlnet" else []
