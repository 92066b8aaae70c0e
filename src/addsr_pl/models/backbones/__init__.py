"""Diffusion backbones behind one interface: what AddSR's training step, the sampler and the exported
student need of a model family (docs/backbones.md).

A backbone turns its components (`parts`: name -> model, tokenizer or scheduler, as a model config
builds them or a student folder holds them) into the noise schedule, the denoiser the sampler calls
(`denoiser(z_t, model timestep, control image in [0, 1], Conditioning) -> prediction`), the conditioner
and the trainable set. Each family is one file here; `backbone(name)` finds it by the name that the
components and the student's manifest carry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any, ClassVar

from peft import LoraConfig
from torch import nn

from addsr_pl.core.noise_schedule import NoiseSchedule
from addsr_pl.core.student_format import BACKBONE_COMPONENTS
from addsr_pl.models.trainable import TRAINABLE_SETS


class Backbone(ABC):
    """One model family.

    `networks` are the denoiser's networks, the student's own (saved inside its folder); `frozen` the
    other components a student folder names. Together they are the family's `BACKBONE_COMPONENTS`.
    """

    name: ClassVar[str]
    networks: ClassVar[tuple[str, ...]]

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(c for c in BACKBONE_COMPONENTS[self.name] if c not in self.networks)

    @abstractmethod
    def noise_schedule(self, parts: dict[str, Any], stage: str) -> NoiseSchedule:
        """The schedule of the family's scheduler (`core.noise_schedule`)."""

    @abstractmethod
    def denoiser(
        self, networks: dict[str, nn.Module], codec: nn.Module, conditioning_scale: float
    ) -> nn.Module:
        """The module the sampler calls, around these networks; `codec` encodes a latent control."""

    @abstractmethod
    def conditioner(self, parts: dict[str, Any], conditioning: dict, resolve=None) -> nn.Module:
        """The `models.conditioning.Conditioner` of a `conditioning` config group for these parts."""

    @abstractmethod
    def trained_modules(self, networks: dict[str, nn.Module], trainable: str) -> list[nn.Module]:
        """The modules `method.trainable` trains in place (none for `lora`, which adds its own)."""

    def check_trainable(self, trainable: str) -> None:
        if trainable not in TRAINABLE_SETS:
            raise ValueError(f"method.trainable = {trainable!r}: must be one of {TRAINABLE_SETS}")

    def trained_parameter_ids(self, networks: dict[str, nn.Module], trainable: str) -> set[int]:
        """ids of the parameters that `select_trainable` will train in place."""
        self.check_trainable(trainable)
        return {id(p) for module in self.trained_modules(networks, trainable) for p in module.parameters()}

    def select_trainable(self, networks: dict[str, nn.Module], trainable: str, lora: dict) -> None:
        """Freeze the student's networks, then unfreeze the trained set, or add LoRA (peft) to each."""
        self.check_trainable(trainable)
        for network in networks.values():
            network.requires_grad_(False)
        if trainable != "lora":
            for module in self.trained_modules(networks, trainable):
                module.requires_grad_(True)
            return
        config = LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            init_lora_weights="gaussian",
            target_modules=list(lora["target_modules"]),
        )
        for network in networks.values():
            network.add_adapter(config)


def component_parts(components) -> dict[str, Any]:
    """name -> component of a components dataclass (everything but its `sources` and `backbone`)."""
    return {
        f.name: getattr(components, f.name)
        for f in fields(components)
        if f.name not in ("sources", "backbone")
    }


def backbone(name: str) -> Backbone:
    """The backbone of a family name (`components.backbone`, a manifest's `backbone`)."""
    from addsr_pl.models.backbones.flux import FluxBackbone
    from addsr_pl.models.backbones.sd2 import SD2Backbone
    from addsr_pl.models.backbones.sd3 import SD3Backbone
    from addsr_pl.models.backbones.sdxl import SDXLBackbone

    known = {b.name: b for b in (SD2Backbone, SD3Backbone, SDXLBackbone, FluxBackbone)}
    if name not in known:
        raise ValueError(f"backbone {name!r}: must be one of {', '.join(known)}")
    return known[name]()
