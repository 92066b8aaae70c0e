"""SDXL: a UNet with added time ids (`addition_embed_type="text_time"`) and a `ControlNetModel` (pixel
control), two CLIP text encoders, DDPM as SD2.

The prompt is diffusers' SDXL one: both encoders' penultimate hidden states side by side, and the second
encoder's pooled projection, packed into one tensor as SD3's (`sd3.pack_prompt`). The added time ids
(original size, crop corner, target size) are the denoised image's own size and no crop: the student
never sees a crop of a larger image. Loaded from a local diffusers folder (`load_sdxl_components`) or
built tiny from config dicts (`build_tiny_sdxl_components`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from addsr_pl.core.noise_schedule import NoiseSchedule, noise_schedule_from
from addsr_pl.core.sampler import Denoiser
from addsr_pl.models.backbones import Backbone
from addsr_pl.models.backbones.sd3 import pack_prompt, unpack_prompt
from addsr_pl.models.conditioning import Conditioner, Conditioning, PromptEncoder, prompt_options, tokenize
from addsr_pl.models.diffusion import (
    character_tokenizer,
    load_teacher_network,
    require_folder,
    tiny_clip_config,
)
from addsr_pl.models.trainable import official_modules

# component -> (subfolder, file that must exist in it) of a diffusers SDXL folder
SDXL_LAYOUT = {
    "unet": ("unet", "config.json"),
    "vae": ("vae", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "text_encoder_2": ("text_encoder_2", "config.json"),
    "tokenizer": ("tokenizer", "tokenizer_config.json"),
    "tokenizer_2": ("tokenizer_2", "tokenizer_config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}


@dataclass
class SDXLComponents:
    """The frozen SDXL parts plus the teacher UNet and ControlNet (`sources` as `DiffusionComponents`)."""

    unet: nn.Module
    controlnet: nn.Module
    vae: AutoencoderKL
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    scheduler: DDPMScheduler
    sources: dict[str, str | None] = field(default_factory=dict)
    backbone: str = "sdxl"


class SDXLPromptEncoder(PromptEncoder):
    """SDXL's prompt: both CLIPs' penultimate hidden states side by side; pooled: the second's projection."""

    def __init__(self, text_encoders: list[nn.Module], tokenizers: list, **options):
        super().__init__(text_encoders[0], tokenizers[0], **options)
        self.text_encoder_2, self.tokenizer_2 = text_encoders[1], tokenizers[1]

    def embed(self, texts: list[str], device: torch.device) -> Tensor:
        first = self.text_encoder(
            tokenize(self.tokenizer, texts, self.tokenizer.model_max_length, device),
            output_hidden_states=True,
        )
        second = self.text_encoder_2(
            tokenize(self.tokenizer_2, texts, self.tokenizer_2.model_max_length, device),
            output_hidden_states=True,
        )
        tokens = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return pack_prompt(tokens, second.text_embeds)


class SDXLDenoiser(Denoiser):
    """SDXL UNet + ControlNet: SD2's denoiser plus the pooled projection and the added time ids."""

    def __init__(
        self, unet: nn.Module, controlnet: nn.Module, codec: nn.Module, conditioning_scale: float = 1.0
    ):
        super().__init__(unet, controlnet, conditioning_scale)
        self.pixels_per_cell = codec.scale_factor  # a number: the codec itself stays outside

    def forward(self, z_t: Tensor, t: Tensor, control_image: Tensor, conditioning: Conditioning) -> Tensor:
        z_t = z_t.to(self.unet.conv_in.weight.dtype)
        pooled_dim = (
            self.unet.config.projection_class_embeddings_input_dim
            - 6 * self.unet.config.addition_time_embed_dim
        )
        tokens, pooled = unpack_prompt(conditioning.text_embeds.to(z_t.dtype), pooled_dim)
        # original size, crop top-left, target size: the image being denoised, uncropped
        h, w = (s * self.pixels_per_cell for s in z_t.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=z_t.dtype, device=z_t.device).expand(
            z_t.shape[0], -1
        )
        added = {"text_embeds": pooled, "time_ids": time_ids}
        down, mid = self.controlnet(
            z_t,
            t,
            encoder_hidden_states=tokens,
            controlnet_cond=control_image.to(z_t.dtype),
            conditioning_scale=self.conditioning_scale,
            added_cond_kwargs=added,
            return_dict=False,
        )[:2]
        return self.unet(
            z_t,
            t,
            encoder_hidden_states=tokens,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class SDXLBackbone(Backbone):
    name = "sdxl"
    networks = ("unet", "controlnet")

    def noise_schedule(self, parts: dict[str, Any], stage: str) -> NoiseSchedule:
        return noise_schedule_from(parts["scheduler"], stage)

    def denoiser(
        self, networks: dict[str, nn.Module], codec: nn.Module, conditioning_scale: float
    ) -> SDXLDenoiser:
        return SDXLDenoiser(networks["unet"], networks["controlnet"], codec, conditioning_scale)

    def conditioner(self, parts: dict[str, Any], conditioning: dict, resolve=None) -> Conditioner:
        if conditioning.get("representation_in_context"):
            raise ValueError(
                "conditioning.representation_in_context = true is not implemented for SDXL: set it false "
                "(the tagger then gives tags only)"
            )
        encoder = SDXLPromptEncoder(
            [parts["text_encoder"], parts["text_encoder_2"]],
            [parts["tokenizer"], parts["tokenizer_2"]],
            **prompt_options(conditioning),
        )
        return Conditioner.with_prompt_encoder(encoder, False, conditioning, resolve)

    def trained_modules(self, networks: dict[str, nn.Module], trainable: str) -> list[nn.Module]:
        if (
            trainable == "official"
        ):  # plain SD2's set: the ControlNet's attentions and its condition embedding
            return official_modules(networks["unet"], networks["controlnet"])
        return [networks["controlnet"]] if trainable == "controlnet" else []


def load_sdxl_components(
    pretrained_path: str, unet_path: str | None = None, controlnet_path: str | None = None
) -> SDXLComponents:
    """SDXL components from a local diffusers folder; the scheduler is read as a `DDPMScheduler` (SDXL's
    folder names Euler's, whose training schedule is the same scaled-linear DDPM one)."""
    key = "model.components.pretrained_path"
    root = Path(pretrained_path).expanduser()
    require_folder(root, SDXL_LAYOUT, "SDXL", key, "unet/ vae/ text_encoder{,_2}/ tokenizer{,_2}/ scheduler/")
    unet_root = Path(unet_path).expanduser() if unet_path else root
    unet = load_teacher_network(UNet2DConditionModel, unet_root, "unet", "UNet")
    if controlnet_path:
        controlnet = load_teacher_network(ControlNetModel, controlnet_path, "controlnet", "ControlNet")
    else:
        controlnet = ControlNetModel.from_unet(unet)
    return SDXLComponents(
        unet=unet,
        controlnet=controlnet,
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"),
        scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        sources={
            **{name: str(root) for name in SDXL_LAYOUT if name != "unet"},
            "unet": str(unet_root),
            "controlnet": str(controlnet_path) if controlnet_path else None,
        },
    )


def build_tiny_sdxl_components(
    unet: dict,
    controlnet: dict,
    vae: dict,
    text_encoder: dict,
    scheduler: dict,
    tokenizer_max_length: int,
    init_seed: int,
    cache_dir: str,
    zero_conv_std: float = 0.0,
    text_encoder_2: dict | None = None,
) -> SDXLComponents:
    """Random-initialised SDXL-shaped components from config dicts (the tiny ones: CPU, seconds): CLIP-L
    from `text_encoder`, CLIP-G (with its projection) from `text_encoder_2` (default: the same), the
    character tokenizer for both; a text encoder's `vocab_size` defaults to the tokenizer's.
    `zero_conv_std` as in `models.diffusion.build_tiny_components`."""
    torch.manual_seed(init_seed)
    tokenizer = character_tokenizer(Path(cache_dir).expanduser() / "tiny_tokenizer", tokenizer_max_length)
    text_configs = [
        tiny_clip_config(tokenizer, tokenizer_max_length, config)
        for config in (text_encoder, text_encoder_2 or text_encoder)
    ]
    unet_model = UNet2DConditionModel(**unet)
    controlnet_model = ControlNetModel.from_unet(unet_model, **controlnet)
    if zero_conv_std > 0:
        zero_convs = [*controlnet_model.controlnet_down_blocks, controlnet_model.controlnet_mid_block]
        for conv in [*zero_convs, controlnet_model.controlnet_cond_embedding.conv_out]:
            nn.init.normal_(conv.weight, std=zero_conv_std)
    return SDXLComponents(
        unet=unet_model,
        controlnet=controlnet_model,
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(text_configs[0]),
        text_encoder_2=CLIPTextModelWithProjection(text_configs[1]),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=DDPMScheduler(**scheduler),
        sources={name: None for name in (*SDXL_LAYOUT, "controlnet")},
    )
