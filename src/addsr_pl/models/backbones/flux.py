"""FLUX.1: an MMDiT with single-stream blocks (`FluxTransformer2DModel`) and an InstantX-style
`FluxControlNetModel`, CLIP-L (pooled) and T5 (tokens), rectified flow.

The transformer works on packed latents: each 2 x 2 patch of latent cells is one token of 4 C values
(`pack_latents` / `unpack_latents`), placed by its (row, column) in the rotary ids (`image_ids`); the
prompt's tokens all sit at id 0 (`text_ids`). The control enters as InstantX's does: the control image
encoded by the frozen codec, packed the same way, through the ControlNet's zero-initialised
`controlnet_x_embedder`, so PSR's control reaches it as the encoded blend. The network takes sigma as its
timestep (it multiplies by 1000 itself). FLUX.1-dev is guidance-distilled: the guidance scale
(`conditioning.guidance_scale`) enters the same time-text embedding as the pooled CLIP projection, so it
travels packed after it in the prompt tensor (`sd3.pack_prompt`). Loaded from a local diffusers folder
(`load_flux_components`) or built tiny from config dicts (`build_tiny_flux_components`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
)
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTokenizer,
    T5EncoderModel,
)

from addsr_pl.core.noise_schedule import NoiseSchedule
from addsr_pl.models.backbones import Backbone
from addsr_pl.models.backbones.sd3 import (
    append_representation,
    flow_noise_schedule,
    pack_prompt,
    representation_in_context,
    unpack_prompt,
)
from addsr_pl.models.conditioning import Conditioner, Conditioning, PromptEncoder, prompt_options, tokenize
from addsr_pl.models.diffusion import (
    MissingWeightsError,
    character_tokenizer,
    load_teacher_network,
    require_folder,
    tiny_clip_config,
    tiny_t5_config,
)

# component -> (subfolder, file that must exist in it) of a diffusers FLUX.1 folder
FLUX_LAYOUT = {
    "transformer": ("transformer", "config.json"),
    "vae": ("vae", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "text_encoder_2": ("text_encoder_2", "config.json"),
    "tokenizer": ("tokenizer", "tokenizer_config.json"),
    "tokenizer_2": ("tokenizer_2", "tokenizer_config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}
# Latent cells per token along each side: FLUX packs 2 x 2 patches (diffusers' `_pack_latents`).
PATCH = 2
# FluxTransformer2DModel and FluxControlNetModel multiply their timestep and guidance by this: the
# sampler's model timestep (1000 sigma) is divided by it, as diffusers' FLUX pipelines do.
FLUX_TIME_SCALE = 1000


@dataclass
class FluxComponents:
    """The frozen FLUX.1 parts plus the teacher transformer and ControlNet; `reference_scheduler` and
    `flow_shift` as `SD3Components`'."""

    transformer: nn.Module
    controlnet: nn.Module
    vae: AutoencoderKL
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    scheduler: FlowMatchEulerDiscreteScheduler
    reference_scheduler: DDPMScheduler
    flow_shift: float = 1.0
    sources: dict[str, str | None] = field(default_factory=dict)
    backbone: str = "flux"


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2 x 2 patch one token, row-major, its channels outermost."""
    b, c, h, w = latents.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"FLUX packs 2 x 2 latent patches: the latent is {h} x {w}, not even")
    patches = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack_latents` for a latent of `height` x `width` cells."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    patches = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[(H/2)(W/2), 3] rotary ids of the packed tokens of an H x W latent: (0, row, column)."""
    rows = torch.arange(height // PATCH, device=device, dtype=dtype)
    cols = torch.arange(width // PATCH, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)


def text_ids(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[L, 3] rotary ids of the context tokens: all zero, as diffusers' FLUX pipelines give them."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def guided(transformer: nn.Module) -> bool:
    """Whether the transformer takes a guidance scale (FLUX.1-dev: guidance-distilled; schnell: not)."""
    return bool(transformer.config.guidance_embeds)


class FluxPromptEncoder(PromptEncoder):
    """FLUX.1's prompt, as diffusers' FLUX pipeline builds it: T5's last hidden state as the context
    tokens; CLIP-L's pooled output as the pooled projection, followed by the guidance scale where the
    transformer is guidance-distilled. Returned packed (`pack_prompt`)."""

    def __init__(
        self,
        text_encoders: list[nn.Module],
        tokenizers: list,
        max_sequence_length: int,
        guidance_scale: float | None,
        **options,
    ):
        super().__init__(text_encoders[0], tokenizers[0], **options)
        self.text_encoder_2, self.tokenizer_2 = text_encoders[1], tokenizers[1]
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale

    def embed(self, texts: list[str], device: torch.device) -> Tensor:
        clip = self.text_encoder(tokenize(self.tokenizer, texts, self.tokenizer.model_max_length, device))
        pooled = clip.pooler_output
        tokens = self.text_encoder_2(tokenize(self.tokenizer_2, texts, self.max_sequence_length, device))[0]
        if self.guidance_scale is not None:
            pooled = torch.cat([pooled, pooled.new_full((pooled.shape[0], 1), self.guidance_scale)], dim=-1)
        return pack_prompt(tokens, pooled.to(tokens.dtype))


class FluxDenoiser(nn.Module):
    """FLUX transformer + InstantX ControlNet predicting the flow velocity from (z_t, 1000 * sigma,
    control image in [0, 1], conditioning), on latents packed and unpacked around the networks."""

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
        """Latent cells per token along each side (the 2 x 2 packing)."""
        return PATCH

    def forward(self, z_t: Tensor, t: Tensor, control_image: Tensor, conditioning: Conditioning) -> Tensor:
        dtype = self.transformer.x_embedder.weight.dtype
        height, width = z_t.shape[-2:]
        hidden = pack_latents(z_t.to(dtype))
        control = pack_latents(self.codec.encode(control_image).to(dtype))
        pooled_dim = self.transformer.config.pooled_projection_dim
        with_guidance = guided(self.transformer)
        tokens, pooled = unpack_prompt(conditioning.text_embeds.to(dtype), pooled_dim + with_guidance)
        guidance = pooled[:, pooled_dim] if with_guidance else None
        pooled = pooled[:, :pooled_dim]
        if conditioning.image_embeds is not None:
            tokens = append_representation(tokens, conditioning.image_embeds.to(dtype))
        inputs = {
            "hidden_states": hidden,
            "encoder_hidden_states": tokens,
            "pooled_projections": pooled,
            "timestep": (t / FLUX_TIME_SCALE).reshape(-1).expand(z_t.shape[0]),
            "img_ids": image_ids(height, width, z_t.device, dtype),
            "txt_ids": text_ids(tokens.shape[1], z_t.device, dtype),
            "guidance": guidance,
            "return_dict": False,
        }
        double, single = self.controlnet(
            controlnet_cond=control, conditioning_scale=self.conditioning_scale, **inputs
        )
        velocity = self.transformer(
            controlnet_block_samples=double, controlnet_single_block_samples=single, **inputs
        )[0]
        return unpack_latents(velocity, height, width)


class FluxBackbone(Backbone):
    name = "flux"
    networks = ("transformer", "controlnet")

    def noise_schedule(self, parts: dict[str, Any], stage: str) -> NoiseSchedule:
        return flow_noise_schedule(parts, stage)  # FLUX's resolution-dependent shift never applied

    def denoiser(
        self, networks: dict[str, nn.Module], codec: nn.Module, conditioning_scale: float
    ) -> FluxDenoiser:
        return FluxDenoiser(networks["transformer"], networks["controlnet"], codec, conditioning_scale)

    def conditioner(self, parts: dict[str, Any], conditioning: dict, resolve=None) -> Conditioner:
        in_context = representation_in_context(conditioning)
        guidance_scale = conditioning.get("guidance_scale")
        if guided(parts["transformer"]) and guidance_scale is None:
            raise ValueError(
                "conditioning.guidance_scale = null, but this FLUX transformer is guidance-distilled "
                "(guidance_embeds): set it (FLUX.1-dev: 3.5)"
            )
        encoder = FluxPromptEncoder(
            [parts["text_encoder"], parts["text_encoder_2"]],
            [parts["tokenizer"], parts["tokenizer_2"]],
            conditioning["max_sequence_length"],
            guidance_scale if guided(parts["transformer"]) else None,
            **prompt_options(conditioning),
        )
        return Conditioner.with_prompt_encoder(encoder, in_context, conditioning, resolve)

    def trained_modules(self, networks: dict[str, nn.Module], trainable: str) -> list[nn.Module]:
        controlnet = networks["controlnet"]
        if trainable == "official":
            # the mapping of SeeSR's set without image attentions (plain SD2's): the ControlNet's
            # attention layers, double- and single-stream, and the embedding its control enters through
            blocks = [*controlnet.transformer_blocks, *controlnet.single_transformer_blocks]
            return [block.attn for block in blocks] + [controlnet.controlnet_x_embedder]
        return [controlnet] if trainable == "controlnet" else []


def _controlnet_from(transformer: nn.Module, num_layers: int, num_single_layers: int) -> nn.Module:
    """An InstantX ControlNet copied from the transformer's first blocks, its control embedding zero."""
    return FluxControlNetModel.from_transformer(
        transformer,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        # from_transformer's defaults are FLUX.1's sizes, not the transformer's own
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )


def _check_instantx(controlnet: nn.Module, root: Path) -> None:
    """The control here is a packed latent: an XLabs ControlNet (a pixel image through its
    `input_hint_block`) or a Union one (a mode per control) reads something else."""
    config = controlnet.config
    kind = (
        "an XLabs-style one (conditioning_embedding_channels: a pixel control image)"
        if config.conditioning_embedding_channels is not None
        else "a Union one (num_mode: a control mode per image)"
        if config.num_mode is not None
        else None
    )
    if kind:
        raise MissingWeightsError(
            f"{root}/controlnet is {kind}; the FLUX backbone feeds an InstantX-style ControlNet the packed "
            "control latent: set `model.components.controlnet_path` to an InstantX-style ControlNet or null"
        )


def load_flux_components(
    pretrained_path: str,
    reference_scheduler: dict,
    controlnet_layers: int,
    controlnet_single_layers: int,
    flow_shift: float = 1.0,
    transformer_path: str | None = None,
    controlnet_path: str | None = None,
) -> FluxComponents:
    """FLUX.1 components from a local diffusers folder (FLUX.1-dev or -schnell).

    Args:
        pretrained_path: folder with `transformer/ vae/ text_encoder{,_2}/ tokenizer{,_2}/ scheduler/`.
        reference_scheduler: the DDPM scheduler's config (SD2-base's) of the config's timesteps.
        controlnet_layers, controlnet_single_layers: double- and single-stream blocks of a fresh
            ControlNet (copied from the transformer's first).
        transformer_path: a folder whose `transformer/` replaces the base's (a trained teacher).
        controlnet_path: a folder with `controlnet/` (a trained teacher, e.g. an InstantX-style upscaler
            ControlNet); default: a fresh ControlNet.
    """
    key = "model.components.pretrained_path"
    root = Path(pretrained_path).expanduser()
    require_folder(
        root, FLUX_LAYOUT, "FLUX.1", key, "transformer/ vae/ text_encoder{,_2}/ tokenizer{,_2}/ scheduler/"
    )
    transformer_root = Path(transformer_path).expanduser() if transformer_path else root
    transformer = load_teacher_network(FluxTransformer2DModel, transformer_root, "transformer", "transformer")
    if controlnet_path:
        controlnet = load_teacher_network(FluxControlNetModel, controlnet_path, "controlnet", "ControlNet")
        _check_instantx(controlnet, Path(controlnet_path).expanduser())
    else:
        controlnet = _controlnet_from(transformer, controlnet_layers, controlnet_single_layers)
    return FluxComponents(
        transformer=transformer,
        controlnet=controlnet,
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        text_encoder_2=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        # FLUX's is T5's (T5TokenizerFast); the class its tokenizer_config.json names, no remote code
        tokenizer_2=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
        reference_scheduler=DDPMScheduler(**reference_scheduler),
        flow_shift=flow_shift,
        sources={
            **{name: str(root) for name in FLUX_LAYOUT if name != "transformer"},
            "transformer": str(transformer_root),
            "controlnet": str(controlnet_path) if controlnet_path else None,
            "reference_scheduler": None,
        },
    )


def build_tiny_flux_components(
    transformer: dict,
    controlnet_layers: int,
    controlnet_single_layers: int,
    vae: dict,
    clip_text_encoder: dict,
    t5_text_encoder: dict,
    reference_scheduler: dict,
    tokenizer_max_length: int,
    init_seed: int,
    cache_dir: str,
    flow_shift: float = 1.0,
    zero_conv_std: float = 0.0,
) -> FluxComponents:
    """Random-initialised FLUX-shaped components from small config dicts (CPU, seconds): CLIP from
    `clip_text_encoder`, T5 from `t5_text_encoder`, the character tokenizer for both.

    A fresh ControlNet's zero-initialised control embedding and output projections make it a no-op;
    `zero_conv_std > 0` draws them from N(0, std), so the random tiny teacher reads its control.
    """
    torch.manual_seed(init_seed)
    tokenizer = character_tokenizer(Path(cache_dir).expanduser() / "tiny_tokenizer", tokenizer_max_length)
    transformer_model = FluxTransformer2DModel(**transformer)
    controlnet = _controlnet_from(transformer_model, controlnet_layers, controlnet_single_layers)
    if zero_conv_std > 0:
        zero = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]
        for layer in [*zero, controlnet.controlnet_x_embedder]:
            nn.init.normal_(layer.weight, std=zero_conv_std)
    return FluxComponents(
        transformer=transformer_model,
        controlnet=controlnet,
        vae=AutoencoderKL(**vae),
        # a text encoder's `vocab_size` defaults to the character tokenizer's (a real-size preset keeps
        # the public vocabulary's, so that its parameter count is the public model's)
        text_encoder=CLIPTextModel(tiny_clip_config(tokenizer, tokenizer_max_length, clip_text_encoder)),
        text_encoder_2=T5EncoderModel(tiny_t5_config(tokenizer, t5_text_encoder)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        reference_scheduler=DDPMScheduler(**reference_scheduler),
        flow_shift=flow_shift,
        sources={name: None for name in (*FLUX_LAYOUT, "controlnet", "reference_scheduler")},
    )
