"""Stable Diffusion 3 / 3.5: an MMDiT (`SD3Transformer2DModel`) with an `SD3ControlNetModel`, three text
encoders (CLIP-L, CLIP-G, T5) and rectified flow.

The control enters as a VAE latent: the denoiser encodes its control image with the frozen codec, so
PSR's control (the decoded x0 blended with the LR) reaches the ControlNet as the encoded blend. The
prompt travels as one tensor, the joint-attention tokens followed by the pooled projection laid out as
tokens (`pack_prompt`), so the sampler, the prompt cache and the teacher's repeats carry it as they
carry SD2's text embeddings. RAM's representation, where `conditioning.representation_in_context` asks for
it, joins that context after the prompt's tokens (`append_representation`). Loaded from a local diffusers folder (`load_sd3_components`) or built
tiny from config dicts (`build_tiny_sd3_components`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
)
from diffusers.configuration_utils import FrozenDict
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
)

from addsr_pl.core.noise_schedule import NoiseSchedule, noise_schedule_from
from addsr_pl.models.backbones import Backbone
from addsr_pl.models.conditioning import Conditioner, Conditioning, PromptEncoder, prompt_options, tokenize
from addsr_pl.models.diffusion import (
    character_tokenizer,
    load_teacher_network,
    require_folder,
    tiny_clip_config,
    tiny_t5_config,
)

# component -> (subfolder, file that must exist in it) of a diffusers SD3 / SD3.5 folder
SD3_LAYOUT = {
    "transformer": ("transformer", "config.json"),
    "vae": ("vae", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "text_encoder_2": ("text_encoder_2", "config.json"),
    "text_encoder_3": ("text_encoder_3", "config.json"),
    "tokenizer": ("tokenizer", "tokenizer_config.json"),
    "tokenizer_2": ("tokenizer_2", "tokenizer_config.json"),
    "tokenizer_3": ("tokenizer_3", "tokenizer_config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}


@dataclass
class SD3Components:
    """The frozen SD3 parts plus the teacher transformer and ControlNet.

    `reference_scheduler` is the DDPM schedule (SD2-base's) whose timesteps the config's are written in
    and that the rectified-flow schedule maps by equal SNR; `flow_shift` the time shift pinned on those
    sigmas (`core.noise_schedule.RectifiedFlowSchedule`). `sources` as `DiffusionComponents.sources`.
    """

    transformer: nn.Module
    controlnet: nn.Module
    vae: AutoencoderKL
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    text_encoder_3: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    scheduler: FlowMatchEulerDiscreteScheduler
    reference_scheduler: DDPMScheduler
    flow_shift: float = 1.0
    sources: dict[str, str | None] = field(default_factory=dict)
    backbone: str = "sd3"


def pooled_tokens(pooled_dim: int, width: int) -> int:
    """How many joint-attention tokens carry a pooled projection of `pooled_dim` values."""
    return math.ceil(pooled_dim / width)


def pack_prompt(tokens: Tensor, pooled: Tensor) -> Tensor:
    """[B, L + n, D]: the joint-attention tokens [B, L, D], then the pooled projection [B, P] zero-padded
    to n = ceil(P / D) tokens."""
    b, _, width = tokens.shape
    n = pooled_tokens(pooled.shape[-1], width)
    padded = F.pad(pooled, (0, n * width - pooled.shape[-1]))
    return torch.cat([tokens, padded.reshape(b, n, width).to(tokens.dtype)], dim=1)


def unpack_prompt(embeds: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """(joint-attention tokens, pooled projection) of a `pack_prompt` tensor."""
    n = pooled_tokens(pooled_dim, embeds.shape[-1])
    return embeds[:, :-n], embeds[:, -n:].reshape(embeds.shape[0], -1)[:, :pooled_dim]


def append_representation(tokens: Tensor, representation: Tensor) -> Tensor:
    """The joint-attention context with the representation's tokens [B, N, D'] after the prompt's,
    zero-padded to its width D as SD3 pads CLIP's to T5's (`conditioning.representation_in_context`: SeeSR's
    image cross-attention has no MMDiT counterpart)."""
    width = tokens.shape[-1]
    if representation.shape[-1] > width:
        raise ValueError(
            f"The representation is {representation.shape[-1]} wide, more than the joint-attention context's "
            f"{width}: it cannot join it (conditioning.representation_in_context=false)"
        )
    return torch.cat([tokens, F.pad(representation, (0, width - representation.shape[-1]))], dim=1)


class SD3PromptEncoder(PromptEncoder):
    """SD3's prompt, as diffusers' SD3 pipeline builds it: the penultimate hidden states of CLIP-L and
    CLIP-G side by side, zero-padded to T5's width, followed by T5's last hidden state; the pooled
    projection is both CLIPs' projected outputs side by side. Returned packed (`pack_prompt`)."""

    def __init__(self, text_encoders: list[nn.Module], tokenizers: list, max_sequence_length: int, **options):
        super().__init__(text_encoders[0], tokenizers[0], **options)
        self.text_encoder_2, self.text_encoder_3 = text_encoders[1:]
        self.tokenizer_2, self.tokenizer_3 = tokenizers[1:]
        self.max_sequence_length = max_sequence_length

    def embed(self, texts: list[str], device: torch.device) -> Tensor:
        clip_tokens, pooled = [], []
        for encoder, tokenizer in (
            (self.text_encoder, self.tokenizer),
            (self.text_encoder_2, self.tokenizer_2),
        ):
            output = encoder(
                tokenize(tokenizer, texts, tokenizer.model_max_length, device), output_hidden_states=True
            )
            clip_tokens.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        t5 = self.text_encoder_3(tokenize(self.tokenizer_3, texts, self.max_sequence_length, device))[0]
        clip = torch.cat(clip_tokens, dim=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(
                f"The CLIP encoders' widths add up to {clip.shape[-1]}, more than T5's {t5.shape[-1]}: "
                "SD3's prompt pads them to T5's width (fix model.components.text_encoder*)"
            )
        tokens = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(clip.dtype)], dim=1)
        return pack_prompt(tokens, torch.cat(pooled, dim=-1))


class SD3Denoiser(nn.Module):
    """SD3 transformer + SD3 ControlNet predicting the flow velocity from (z_t, 1000 * sigma, control
    image in [0, 1], conditioning); the control image is encoded by the frozen `codec` first."""

    def __init__(
        self, transformer: nn.Module, controlnet: nn.Module, codec: nn.Module, conditioning_scale: float = 1.0
    ):
        super().__init__()
        self.transformer = transformer
        self.controlnet = controlnet
        self.codec = codec
        self.conditioning_scale = conditioning_scale

    def networks(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer, "controlnet": self.controlnet}

    @property
    def downsampling(self) -> int:
        """Latent cells per token along each side (the patch size)."""
        return int(self.transformer.config.patch_size)

    def forward(self, z_t: Tensor, t: Tensor, control_image: Tensor, conditioning: Conditioning) -> Tensor:
        dtype = self.transformer.pos_embed.proj.weight.dtype
        z_t = z_t.to(dtype)
        control = self.codec.encode(control_image).to(dtype)
        tokens, pooled = unpack_prompt(
            conditioning.text_embeds.to(dtype), self.transformer.config.pooled_projection_dim
        )
        if conditioning.image_embeds is not None:
            tokens = append_representation(tokens, conditioning.image_embeds.to(dtype))
        residuals = self.controlnet(
            hidden_states=z_t,
            controlnet_cond=control,
            conditioning_scale=self.conditioning_scale,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t,
            return_dict=False,
        )[0]
        return self.transformer(
            hidden_states=z_t,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t,
            block_controlnet_hidden_states=residuals,
            return_dict=False,
        )[0]


def flow_noise_schedule(parts: dict[str, Any], stage: str) -> NoiseSchedule:
    """The rectified-flow schedule of an MMDiT family (SD3, FLUX): equal-SNR sigmas of the reference DDPM
    schedule with only the pinned `flow_shift`, never the scheduler's own shift (SD3's static one, FLUX's
    by resolution). A student folder carries no shift: its exported timesteps are the shifted sigmas."""
    return noise_schedule_from(
        parts["scheduler"], stage, reference=parts["reference_scheduler"], shift=parts.get("flow_shift", 1.0)
    )


def representation_in_context(conditioning: dict) -> bool:
    """`conditioning.representation_in_context`, refused without a tagger to give the representation."""
    in_context = conditioning.get("representation_in_context", False)
    if in_context and not conditioning.get("tagger"):
        raise ValueError(
            "conditioning.representation_in_context = true needs a tagger for the representation: set "
            "conditioning.tagger (e.g. conditioning=ram) or representation_in_context=false"
        )
    return in_context


class SD3Backbone(Backbone):
    name = "sd3"
    networks = ("transformer", "controlnet")

    def noise_schedule(self, parts: dict[str, Any], stage: str) -> NoiseSchedule:
        return flow_noise_schedule(parts, stage)

    def denoiser(
        self, networks: dict[str, nn.Module], codec: nn.Module, conditioning_scale: float
    ) -> SD3Denoiser:
        return SD3Denoiser(networks["transformer"], networks["controlnet"], codec, conditioning_scale)

    def conditioner(self, parts: dict[str, Any], conditioning: dict, resolve=None) -> Conditioner:
        # SD3 has no image cross-attention: the representation, where used, joins the prompt's tokens
        in_context = representation_in_context(conditioning)
        encoder = SD3PromptEncoder(
            [parts["text_encoder"], parts["text_encoder_2"], parts["text_encoder_3"]],
            [parts["tokenizer"], parts["tokenizer_2"], parts["tokenizer_3"]],
            conditioning["max_sequence_length"],
            **prompt_options(conditioning),
        )
        return Conditioner.with_prompt_encoder(encoder, in_context, conditioning, resolve)

    def trained_modules(self, networks: dict[str, nn.Module], trainable: str) -> list[nn.Module]:
        controlnet = networks["controlnet"]
        if trainable == "official":
            # the mapping of SeeSR's set without image attentions (plain SD2's): the ControlNet's
            # attention layers and the embedding its control enters through
            return [block.attn for block in controlnet.transformer_blocks] + [controlnet.pos_embed_input]
        return [controlnet] if trainable == "controlnet" else []


def _controlnet_from(transformer: nn.Module, num_layers: int) -> nn.Module:
    """A ControlNet copied from the transformer's first `num_layers` blocks, its control embedding zero."""
    config = FrozenDict(transformer.config)
    # no extra channels: the control is a plain latent of the VAE (SR), not InstantX's inpainting mask
    controlnet = SD3ControlNetModel.from_transformer(
        transformer, num_layers=num_layers, num_extra_conditioning_channels=0
    )
    # diffusers writes the ControlNet's num_layers into the transformer's own config: put it back, or the
    # saved transformer would not load
    transformer._internal_dict = config
    return controlnet


def load_sd3_components(
    pretrained_path: str,
    reference_scheduler: dict,
    controlnet_layers: int,
    flow_shift: float = 1.0,
    transformer_path: str | None = None,
    controlnet_path: str | None = None,
) -> SD3Components:
    """SD3 / SD3.5 components from a local diffusers folder.

    Args:
        pretrained_path: folder with `transformer/ vae/ text_encoder{,_2,_3}/ tokenizer{,_2,_3}/ scheduler/`.
        reference_scheduler: the DDPM scheduler's config (SD2-base's) of the config's timesteps.
        controlnet_layers: transformer blocks of a fresh ControlNet (copied from the transformer's first).
        transformer_path: a folder whose `transformer/` replaces the base's (a trained teacher).
        controlnet_path: a folder with `controlnet/` (a trained teacher); default: a fresh ControlNet.
    """
    key = "model.components.pretrained_path"
    root = Path(pretrained_path).expanduser()
    require_folder(
        root, SD3_LAYOUT, "SD3", key, "transformer/ vae/ text_encoder{,_2,_3}/ tokenizer{,_2,_3}/ scheduler/"
    )
    transformer_root = Path(transformer_path).expanduser() if transformer_path else root
    transformer = load_teacher_network(SD3Transformer2DModel, transformer_root, "transformer", "transformer")
    if controlnet_path:
        controlnet = load_teacher_network(SD3ControlNetModel, controlnet_path, "controlnet", "ControlNet")
    else:
        controlnet = _controlnet_from(transformer, controlnet_layers)
    return SD3Components(
        transformer=transformer,
        controlnet=controlnet,
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3"),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"),
        # SD3's is T5's (T5TokenizerFast); the class its tokenizer_config.json names, no remote code
        tokenizer_3=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_3", local_files_only=True),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
        reference_scheduler=DDPMScheduler(**reference_scheduler),
        flow_shift=flow_shift,
        sources={
            **{name: str(root) for name in SD3_LAYOUT if name != "transformer"},
            "transformer": str(transformer_root),
            "controlnet": str(controlnet_path) if controlnet_path else None,
            "reference_scheduler": None,
        },
    )


def build_tiny_sd3_components(
    transformer: dict,
    controlnet_layers: int,
    vae: dict,
    clip_text_encoder: dict,
    t5_text_encoder: dict,
    reference_scheduler: dict,
    tokenizer_max_length: int,
    init_seed: int,
    cache_dir: str,
    flow_shift: float = 1.0,
    zero_conv_std: float = 0.0,
    clip_text_encoder_2: dict | None = None,
) -> SD3Components:
    """Random-initialised SD3-shaped components from config dicts (the tiny ones: CPU, seconds): CLIP-L
    from `clip_text_encoder`, CLIP-G from `clip_text_encoder_2` (default: the same), T5 from
    `t5_text_encoder`, the character tokenizer for all three. A text encoder's `vocab_size` defaults to the
    tokenizer's; a real-size preset sets the public one (the character ids stay below it).

    A fresh ControlNet's zero-initialised control embedding and output projections make it a no-op;
    `zero_conv_std > 0` draws them from N(0, std), so the random tiny teacher reads its control.
    """
    torch.manual_seed(init_seed)
    tokenizer = character_tokenizer(Path(cache_dir).expanduser() / "tiny_tokenizer", tokenizer_max_length)
    clip_configs = [
        tiny_clip_config(tokenizer, tokenizer_max_length, config)
        for config in (clip_text_encoder, clip_text_encoder_2 or clip_text_encoder)
    ]
    transformer_model = SD3Transformer2DModel(**transformer)
    controlnet = _controlnet_from(transformer_model, controlnet_layers)
    if zero_conv_std > 0:
        for layer in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
            nn.init.normal_(layer.weight, std=zero_conv_std)
    return SD3Components(
        transformer=transformer_model,
        controlnet=controlnet,
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModelWithProjection(clip_configs[0]),
        text_encoder_2=CLIPTextModelWithProjection(clip_configs[1]),
        text_encoder_3=T5EncoderModel(tiny_t5_config(tokenizer, t5_text_encoder)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        reference_scheduler=DDPMScheduler(**reference_scheduler),
        flow_shift=flow_shift,
        sources={name: None for name in (*SD3_LAYOUT, "controlnet", "reference_scheduler")},
    )
