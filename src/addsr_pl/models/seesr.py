"""SeeSR's UNet and ControlNet: diffusers' models plus a representation (image) cross-attention.

SeeSR (and AddSR, which starts from SeeSR's weights) gives every cross-attention down, mid and up
block an `image_attentions` list parallel to its text `attentions`: one stock `Transformer2DModel`
per layer, built with the text attention's arguments except that it cross-attends to the RAM
representation ([B, N, 512]) instead of the text. Per layer the order is
resnet -> text attention -> image attention. Module and parameter names are SeeSR's
(`down_blocks.0.image_attentions.0.proj_in.weight`, ...), so SeeSR's `unet/` and `controlnet/`
folders load as they are, and the config flag `use_image_cross_attention` round-trips through
`config.json`.

The stock block forwards stay untouched: each image attention runs as a forward hook of its text
attention. The representation reaches the hooks through a `RepresentationSlot`, a thread-local
attribute holder owned by the model, which the model's forward fills for the duration of one call
and empties afterwards. An attribute, unlike a context variable, is something `torch.compile`
traces: a denoiser step compiles to one graph without breaks.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from diffusers import ControlNetModel, Transformer2DModel, UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
)
from torch import Tensor, nn

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
IMAGE_ATTENTIONS = "image_attentions"
# SeeSR hard-codes the representation width in its blocks (RAM's image_proj output); it is a config
# key here so that tiny test models can be narrower, and this is its default.
SEESR_IMAGE_CROSS_ATTENTION_DIM = 512


class RepresentationSlot(threading.local):
    """The representation of the forward call in progress, read by a model's image-attention hooks.

    Thread-local, so threads sharing one model each see their own call's representation; copies
    (EMA, export) get an empty slot of their own.
    """

    def __init__(self) -> None:
        self.states: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> RepresentationSlot:
        return RepresentationSlot()

    def __reduce__(self):
        return RepresentationSlot, ()


# The block types SeeSR gives an `image_attentions` list (diffusers' cross-attention UNet blocks).
_IMAGE_ATTENTION_BLOCKS = (CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D)


def _image_attention_like(text_attention: Transformer2DModel, image_cross_attention_dim: int) -> nn.Module:
    """A fresh Transformer2DModel with the text attention's arguments, cross-attending to the representation."""
    arguments = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    arguments["cross_attention_dim"] = image_cross_attention_dim
    return Transformer2DModel(**arguments)


def _run_image_attention(
    slot: RepresentationSlot, image_attention: nn.Module, text_attention, args, kwargs, output
):
    """Forward hook of a text attention: feed its output through the parallel image attention."""
    states = slot.states
    if states is None:
        raise RuntimeError(
            "An image attention ran outside a forward call of SeeSRUNet2DConditionModel / SeeSRControlNetModel; "
            "call the model itself with image_encoder_hidden_states=..."
        )
    hidden = output[0] if isinstance(output, tuple) else output.sample
    # The same attention mask and cross_attention_kwargs as the text attention (as SeeSR passes them);
    # the text's encoder_attention_mask is over text tokens, so it does not apply to the representation.
    hidden = image_attention(
        hidden,
        encoder_hidden_states=states,
        cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
        attention_mask=kwargs.get("attention_mask"),
        return_dict=False,
    )[0]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.sample = hidden
    return output


class _ImageCrossAttention:
    """What SeeSR adds to a diffusers UNet/ControlNet; mixed into the two model classes below."""

    def _seesr_setup(self, use_image_cross_attention: bool, image_cross_attention_dim: int) -> None:
        """The end of both models' __init__: record SeeSR's two config keys, add the image attentions."""
        self.register_to_config(
            use_image_cross_attention=use_image_cross_attention,
            image_cross_attention_dim=image_cross_attention_dim,
        )
        if use_image_cross_attention:
            self._add_image_attentions(image_cross_attention_dim)

    def forward(self, *args, image_encoder_hidden_states: Tensor | None = None, **kwargs):
        """The diffusers model's forward, plus the representation [B, N, D] for the image attentions."""
        with self._representation(image_encoder_hidden_states):
            return super().forward(*args, **kwargs)

    def _add_image_attentions(self, image_cross_attention_dim: int) -> None:
        # Not an nn.Module attribute: no parameters, nothing in the state dict.
        self._representation_slot = RepresentationSlot()
        blocks = [*self.down_blocks, self.mid_block, *getattr(self, "up_blocks", ())]
        for block in blocks:
            if not isinstance(block, _IMAGE_ATTENTION_BLOCKS):
                continue
            block.image_attentions = nn.ModuleList(
                _image_attention_like(attention, image_cross_attention_dim) for attention in block.attentions
            )
            for attention, image_attention in zip(block.attentions, block.image_attentions):
                attention.register_forward_hook(
                    partial(_run_image_attention, self._representation_slot, image_attention),
                    with_kwargs=True,
                )

    @contextmanager
    def _representation(self, image_encoder_hidden_states: Tensor | None) -> Iterator[None]:
        name = type(self).__name__
        if self.config.use_image_cross_attention and image_encoder_hidden_states is None:
            raise ValueError(
                f"This {name} has image cross-attention (use_image_cross_attention=True): pass the "
                f"representation as image_encoder_hidden_states [B, N, {self.config.image_cross_attention_dim}]."
            )
        if not self.config.use_image_cross_attention and image_encoder_hidden_states is not None:
            raise ValueError(
                f"This {name} has no image cross-attention (use_image_cross_attention=False) but got "
                "image_encoder_hidden_states; build it with use_image_cross_attention=True or pass None."
            )
        if image_encoder_hidden_states is None:
            yield
            return
        slot = self._representation_slot
        slot.states = image_encoder_hidden_states
        try:
            yield
        finally:
            slot.states = None


def _with_seesr_arguments(parent_init):
    """The parent's __init__ signature plus SeeSR's two keyword arguments.

    diffusers reads a model's config keys from its __init__ signature, so the extended signature is
    what makes `use_image_cross_attention` load from and save to config.json.
    """
    signature = inspect.signature(parent_init)
    extra = [
        inspect.Parameter("use_image_cross_attention", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter(
            "image_cross_attention_dim",
            inspect.Parameter.KEYWORD_ONLY,
            default=SEESR_IMAGE_CROSS_ATTENTION_DIM,
        ),
    ]

    def decorate(init):
        init.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        return init

    return decorate


class SeeSRUNet2DConditionModel(_ImageCrossAttention, UNet2DConditionModel):
    """diffusers' UNet2DConditionModel with SeeSR's image cross-attention.

    Args (besides UNet2DConditionModel's):
        use_image_cross_attention: add `image_attentions` to every cross-attention block (SeeSR: true).
        image_cross_attention_dim: width of the representation tokens; SeeSR hard-codes 512 (RAM's
            `image_proj` width), which is the default here.
    """

    @_with_seesr_arguments(UNet2DConditionModel.__init__)
    def __init__(
        self,
        *args,
        use_image_cross_attention: bool = False,
        image_cross_attention_dim: int = SEESR_IMAGE_CROSS_ATTENTION_DIM,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._seesr_setup(use_image_cross_attention, image_cross_attention_dim)

    @classmethod
    def from_sd_and_seesr(
        cls,
        sd_path: str | Path,
        seesr_path: str | Path | None = None,
        subfolder: str = "unet",
        image_cross_attention_dim: int = SEESR_IMAGE_CROSS_ATTENTION_DIM,
    ) -> SeeSRUNet2DConditionModel:
        """SeeSR's hybrid loading (its `from_pretrained_orig`): an SD UNet with image attentions added.

        Every weight comes from `<sd_path>/<subfolder>`, except the image attentions, which come from
        `<seesr_path>/<subfolder>` (all of them, or the load fails), or are freshly initialised when
        `seesr_path` is None (the start of teacher training).
        """
        sd_folder = Path(sd_path) / subfolder
        config = json.loads(_require_file(sd_folder / "config.json", "the SD UNet config").read_text())
        config.update(use_image_cross_attention=True, image_cross_attention_dim=image_cross_attention_dim)
        model = cls.from_config(config)
        state = _load_safetensors(sd_folder / WEIGHTS_NAME, "the SD UNet weights")
        if seesr_path is not None:
            seesr_state = _load_safetensors(
                Path(seesr_path) / subfolder / WEIGHTS_NAME, "the SeeSR UNet weights"
            )
            state.update({k: v for k, v in seesr_state.items() if f".{IMAGE_ATTENTIONS}." in k})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if seesr_path is None:
            missing = [k for k in missing if f".{IMAGE_ATTENTIONS}." not in k]
        if missing or unexpected:
            raise RuntimeError(
                f"Hybrid UNet load from {sd_folder} and {seesr_path}: missing keys {missing[:5]} "
                f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)}). Check that both "
                "folders hold SD2-layout UNets with the same block sizes."
            )
        return model


class SeeSRControlNetModel(_ImageCrossAttention, ControlNetModel):
    """diffusers' ControlNetModel with SeeSR's image cross-attention in its down and mid blocks."""

    @_with_seesr_arguments(ControlNetModel.__init__)
    def __init__(
        self,
        *args,
        use_image_cross_attention: bool = False,
        image_cross_attention_dim: int = SEESR_IMAGE_CROSS_ATTENTION_DIM,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._seesr_setup(use_image_cross_attention, image_cross_attention_dim)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *args,
        load_weights_from_unet: bool = True,
        use_image_cross_attention: bool | None = None,
        **kwargs,
    ) -> SeeSRControlNetModel:
        """ControlNetModel.from_unet, copying the image attentions too (as SeeSR's from_unet does).

        `use_image_cross_attention` defaults to the UNet's own flag.
        """
        unet_flag = bool(unet.config.get("use_image_cross_attention", False))
        if use_image_cross_attention is None:
            use_image_cross_attention = unet_flag
        if use_image_cross_attention and load_weights_from_unet and not unet_flag:
            raise ValueError(
                "from_unet(use_image_cross_attention=True, load_weights_from_unet=True) needs a UNet with "
                "image attentions to copy; pass load_weights_from_unet=False for fresh ones."
            )
        # The parent derives the ControlNet config from the UNet's; build that one without memory.
        with torch.device("meta"):
            template = super().from_unet(unet, *args, load_weights_from_unet=False, **kwargs)
        config = {k: v for k, v in template.config.items() if not k.startswith("_")}
        config["use_image_cross_attention"] = use_image_cross_attention
        if "image_cross_attention_dim" in unet.config:
            config["image_cross_attention_dim"] = unet.config.image_cross_attention_dim
        controlnet = cls.from_config(config)
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding"):
                if getattr(controlnet, name, None) is not None:
                    getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
            # Strict on the ControlNet's side; a UNet with image attentions feeding a ControlNet
            # without them leaves those UNet keys unused.
            for name in ("down_blocks", "mid_block"):
                source = getattr(unet, name).state_dict()
                target = getattr(controlnet, name)
                if not use_image_cross_attention:
                    source = {k: v for k, v in source.items() if f"{IMAGE_ATTENTIONS}." not in k}
                target.load_state_dict(source)
        return controlnet


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"Missing {what}: expected {path}. Point the path at a diffusers-layout folder that holds it."
        )
    return path


def _load_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_require_file(path, what)), device="cpu")
