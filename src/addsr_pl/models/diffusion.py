"""Stable Diffusion 2 components: loaded from a local diffusers-layout folder, or tiny ones built from config.

Both routes return `DiffusionComponents`, which also records where each component came from so that
an exported student can name every part it needs.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config

# (subfolder, file that must exist in it) for every SD2 component we read.
SD2_LAYOUT = {
    "unet": ("unet", "config.json"),
    "vae": ("vae", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "tokenizer": ("tokenizer", "tokenizer_config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}


class MissingWeightsError(FileNotFoundError):
    """A weight folder or file the configuration points at does not exist."""


class WeightsMismatchError(ValueError):
    """A weight folder holds weights that do not fit the configured model: some would be dropped or missing."""


IMAGE_ATTENTION_KEY = ".image_attentions."
SEESR_HINT = (
    "this folder holds SeeSR weights (image attentions): use model=sd2_seesr conditioning=ram with "
    "model.components.seesr_path=<folder> (tiny preset: model=tiny_seesr conditioning=tiny_ram)"
)
PLAIN_HINT = (
    "this folder holds weights without SeeSR's image attentions: use model=sd2 (tiny preset: model=tiny), "
    "or model.components.hybrid=true to add fresh image attentions to an SD2 UNet"
)


def load_checked(cls, root: Path, subfolder: str, key: str) -> nn.Module:
    """`cls.from_pretrained(root, subfolder=subfolder)`, refused when any weight is dropped or missing.

    diffusers only warns when a checkpoint's keys do not fit the class (a SeeSR folder read by the plain
    UNet silently loses every image attention), so the keys are compared here and any difference is an
    error naming the folder, a few keys and the fix (`key` is the config key that chose the folder).
    """
    verbosity = diffusers_logging.get_verbosity()
    # diffusers' own warning lists every key (thousands of lines for SD2); the error below replaces it
    diffusers_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(root, subfolder=subfolder, output_loading_info=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    unexpected = list(info.get("unexpected_keys") or [])
    missing = list(info.get("missing_keys") or [])
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []]
    if not (unexpected or missing or mismatched):
        return model
    if any(IMAGE_ATTENTION_KEY in k for k in unexpected):
        fix = SEESR_HINT
    elif any(IMAGE_ATTENTION_KEY in k for k in missing):
        fix = PLAIN_HINT
    else:
        fix = f"set `{key}` to a folder saved from a model of this configuration"
    found = [
        f"{len(keys)} {kind} (e.g. {', '.join(sorted(keys)[:3])})"
        for kind, keys in (("unused", unexpected), ("missing", missing), ("of another shape", mismatched))
        if keys
    ]
    raise WeightsMismatchError(
        f"{Path(root) / subfolder}: its weights do not fit {cls.__name__}: {'; '.join(found)} keys; {fix}."
    )


@dataclass
class DiffusionComponents:
    """The frozen SD parts plus the teacher UNet and ControlNet.

    `sources` maps a component name to the folder it was loaded from (None: built here, so an export
    must save it).
    """

    unet: nn.Module
    controlnet: nn.Module
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    sources: dict[str, str | None] = field(default_factory=dict)
    backbone: str = "sd2"  # `models.backbones`


def require_file(path: str | Path, what: str, key: str) -> Path:
    """Return `path` if it exists, else raise an error naming the config key and the expected file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError(
            f"{what} not found at {path}. Set `{key}` to the folder that holds it "
            "(see the README's 'Weights' section for the expected layout)."
        )
    return path


def load_teacher_network(cls, folder: str | Path, subfolder: str, what: str) -> nn.Module:
    """A teacher network (`what`: UNet, ControlNet, transformer) from `folder/<subfolder>/`: its config.json
    required, its weights refused as `load_checked` refuses them; `model.components.<subfolder>_path` is the
    config key that names the folder."""
    root = Path(folder).expanduser()
    key = f"model.components.{subfolder}_path"
    require_file(root / subfolder / "config.json", f"teacher {what} ({subfolder}/config.json)", key)
    return load_checked(cls, root, subfolder, key)


def require_folder(
    root: Path, layout: dict[str, tuple[str, str]], what: str, key: str, expected: str
) -> None:
    """A diffusers folder with every (subfolder, marker file) of `layout`, all missing ones named in one
    line with the config key that chose the folder; `what` names the family, `expected` its subfolders."""
    require_file(root, f"{what} folder", key)
    missing = [f"{sub}/{marker}" for sub, marker in layout.values() if not (root / sub / marker).is_file()]
    if missing:
        raise MissingWeightsError(
            f"{root} is not a complete diffusers {what} folder: missing {', '.join(missing)}. Set `{key}` to a "
            f"folder with {expected}."
        )


def _check_sd2_folder(root: Path, key: str) -> None:
    require_file(root, "Stable Diffusion 2 folder", key)
    for name, (sub, marker) in SD2_LAYOUT.items():
        require_file(root / sub / marker, f"SD2 {name} ({sub}/{marker})", key)


def load_sd2_components(
    pretrained_path: str,
    unet_path: str | None = None,
    controlnet_path: str | None = None,
) -> DiffusionComponents:
    """SD2-base components from a local diffusers folder.

    Args:
        pretrained_path: folder with `unet/ vae/ text_encoder/ tokenizer/ scheduler/`.
        unet_path: a folder whose `unet/` replaces the SD2 UNet (a trained teacher); default SD2's.
        controlnet_path: a folder with `controlnet/`; default: a ControlNet initialised from the UNet.
    """
    root = Path(pretrained_path).expanduser()
    _check_sd2_folder(root, "model.components.pretrained_path")
    unet_root = Path(unet_path).expanduser() if unet_path else root
    unet = load_teacher_network(UNet2DConditionModel, unet_root, "unet", "UNet")
    if controlnet_path:
        controlnet = load_teacher_network(ControlNetModel, controlnet_path, "controlnet", "ControlNet")
    else:
        controlnet = ControlNetModel.from_unet(unet)
    return DiffusionComponents(
        unet=unet,
        controlnet=controlnet,
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        sources={
            "vae": str(root),
            "text_encoder": str(root),
            "tokenizer": str(root),
            "scheduler": str(root),
            "unet": str(unet_root),
            "controlnet": str(controlnet_path) if controlnet_path else None,
        },
    )


def load_seesr_components(pretrained_path: str, seesr_path: str, hybrid: bool = False) -> DiffusionComponents:
    """SD2-base's VAE, text encoder, tokenizer and scheduler plus SeeSR's UNet and ControlNet.

    Args:
        pretrained_path: the SD2-base folder (diffusers layout).
        seesr_path: the SeeSR folder with `unet/` and `controlnet/`.
        hybrid: build the UNet from SD2's weights plus SeeSR's image attentions (SeeSR's
            `from_pretrained_orig`) instead of reading SeeSR's full UNet.
    """
    from addsr_pl.models.seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    root = Path(pretrained_path).expanduser()
    _check_sd2_folder(root, "model.components.pretrained_path")
    seesr = Path(seesr_path).expanduser()
    for sub in ("unet", "controlnet"):
        require_file(
            seesr / sub / "config.json", f"SeeSR {sub} ({sub}/config.json)", "model.components.seesr_path"
        )
    if hybrid:
        unet = SeeSRUNet2DConditionModel.from_sd_and_seesr(root, seesr, subfolder="unet")
    else:
        unet = load_checked(SeeSRUNet2DConditionModel, seesr, "unet", "model.components.seesr_path")
    controlnet = load_checked(SeeSRControlNetModel, seesr, "controlnet", "model.components.seesr_path")
    for name, model in (("unet", unet), ("controlnet", controlnet)):
        # a plain SD folder loads into the SeeSR classes without a missing key, as a model without
        # image attentions: the teacher would silently lose its representation branch
        if not model.config.get("use_image_cross_attention", False):
            raise WeightsMismatchError(
                f"{seesr / name}: its config has no image attentions (use_image_cross_attention is not "
                f"true), so it is not a SeeSR {name}; {PLAIN_HINT}."
            )
    return DiffusionComponents(
        unet=unet,
        controlnet=controlnet,
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        sources={
            **{name: str(root) for name in ("vae", "text_encoder", "tokenizer", "scheduler")},
            "unet": None if hybrid else str(seesr),
            "controlnet": str(seesr),
        },
    )


def character_tokenizer(folder: Path, max_length: int) -> CLIPTokenizer:
    """A CLIP tokenizer over single printable characters, written to `folder`.

    Tiny test models need a real tokenizer but cannot download CLIP's vocabulary.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if c.isprintable() and not c.isspace()]
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=max_length
    )


def tiny_clip_config(tokenizer: CLIPTokenizer, max_length: int, config: dict) -> CLIPTextConfig:
    """A CLIP text encoder's config for the character tokenizer: its vocabulary size (unless `config`
    sets the public one), special tokens and `max_length` positions, under `config`."""
    base = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return CLIPTextConfig(**base | config)


def tiny_t5_config(tokenizer: CLIPTokenizer, config: dict) -> T5Config:
    """A T5 encoder's config for the character tokenizer (vocabulary size unless `config` sets it, padding
    and end tokens, decoding from the pad token), under `config`."""
    base = {
        "vocab_size": len(tokenizer),
        "decoder_start_token_id": tokenizer.pad_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return T5Config(**base | config)


def build_tiny_components(
    unet: dict,
    controlnet: dict,
    vae: dict,
    text_encoder: dict,
    scheduler: dict,
    tokenizer_max_length: int,
    init_seed: int,
    cache_dir: str,
    zero_conv_std: float = 0.0,
    image_cross_attention_dim: int | None = None,
    unet_path: str | None = None,
    controlnet_path: str | None = None,
    vae_path: str | None = None,
    codec: str = "vae",
) -> DiffusionComponents:
    """Random-initialised SD-shaped components from small config dicts (CPU, seconds).

    `codec`: "vae" builds `AutoencoderKL(**vae)`; "pixel_unshuffle" a lossless `PixelUnshuffleCodec`
    with the same factor (2 per VAE block after the first) and `vae`'s in_channels and scaling_factor,
    whose latents have in_channels x factor**2 channels: the UNet's in and out channels must match.

    A fresh ControlNet's zero convolutions make it a no-op that passes no gradient to its inner
    layers; `zero_conv_std > 0` draws them from N(0, std) so a random tiny teacher uses its control
    image and every trainable set learns.
    """
    torch.manual_seed(init_seed)
    tokenizer = character_tokenizer(Path(cache_dir).expanduser() / "tiny_tokenizer", tokenizer_max_length)
    text_config = tiny_clip_config(tokenizer, tokenizer_max_length, text_encoder)
    if image_cross_attention_dim:
        from addsr_pl.models.seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

        unet_model = SeeSRUNet2DConditionModel(
            **unet, use_image_cross_attention=True, image_cross_attention_dim=image_cross_attention_dim
        )
        controlnet_model = SeeSRControlNetModel.from_unet(unet_model, **controlnet)
    else:
        unet_model = UNet2DConditionModel(**unet)
        controlnet_model = ControlNetModel.from_unet(unet_model, **controlnet)
    if zero_conv_std > 0:
        zero_convs = [*controlnet_model.controlnet_down_blocks, controlnet_model.controlnet_mid_block]
        for conv in [*zero_convs, controlnet_model.controlnet_cond_embedding.conv_out]:
            nn.init.normal_(conv.weight, std=zero_conv_std)
    components = DiffusionComponents(
        unet=unet_model,
        controlnet=controlnet_model,
        vae=tiny_codec(codec, vae, unet),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**scheduler),
        sources={
            name: None for name in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")
        },
    )
    return swap_in_folders(components, unet=unet_path, controlnet=controlnet_path, vae=vae_path)


CODECS = ("vae", "pixel_unshuffle")


def tiny_codec(codec: str, vae: dict, unet: dict) -> nn.Module:
    """The tiny preset's codec (`model.components.codec`): its VAE, or the lossless pixel-unshuffle codec."""
    if codec == "vae":
        return AutoencoderKL(**vae)
    if codec != "pixel_unshuffle":
        raise ValueError(f"model.components.codec = {codec!r}: must be one of {', '.join(CODECS)}.")
    from addsr_pl.models.vae import PixelUnshuffleCodec

    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    model = PixelUnshuffleCodec(vae["in_channels"], factor, vae["scaling_factor"])
    for key in ("in_channels", "out_channels"):
        if unet[key] != model.latent_channels:
            raise ValueError(
                f"model.components.unet.{key} = {unet[key]}, but the pixel_unshuffle codec's latents have "
                f"{model.latent_channels} channels ({vae['in_channels']} x {factor}^2): set "
                f"model.components.unet.{key}={model.latent_channels}."
            )
    return model


def swap_in_folders(components: DiffusionComponents, **folders: str | None) -> DiffusionComponents:
    """Replace components by trained ones saved with `save_pretrained`: `name=<folder holding name/>`.

    Each keeps its class (a SeeSR UNet stays one); the folder is recorded in `sources`.
    """
    for name, folder in folders.items():
        if not folder:
            continue
        root = Path(folder).expanduser()
        require_file(
            root / name / "config.json", f"{name} ({name}/config.json)", f"model.components.{name}_path"
        )
        cls = type(getattr(components, name))
        if name in ("unet", "controlnet"):
            model = load_checked(cls, root, name, f"model.components.{name}_path")
        else:
            model = cls.from_pretrained(root, subfolder=name)
        setattr(components, name, model)
        components.sources[name] = str(root)
    return components
