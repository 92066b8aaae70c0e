"""Random tiny weights in the layout of the released AddSR model, written deterministically from a seed.

`write_official_layout(root, seed)` writes what the official README asks users to download, at a tiny
size: `stable-diffusion-2-base/` (tokenizer, text_encoder, vae, scheduler, feature_extractor),
`addsr/unet` + `addsr/controlnet` (SeeSR-style models, `_class_name` as the official classes save it),
`ram/ram_swin_large_14m.pth` (state dict under "model") with RAM's two tag files, `DAPE.pth` (LoRA
only), plus a small LR image. Every parameter is re-drawn with unit-variance scaling (matrices
N(0, 1/fan_in), norm gains 1 + N(0, 0.01), other vectors N(0, 0.01)) so that outputs are far from
constant and every weight matters. The same folders fed the official `test_addsr.py` to make
`tests/data/compat/addsr_official_tiny.png` (docs/compatibility.md, "The released AddSR model").

    python tests/official_layout.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# RAM's fixed input and representation sizes (the official pipeline resizes to 384; SeeSR's image
# attention is 512 wide), at a tiny Swin / tagging-head width.
RAM_ARCHITECTURE = {
    "image_size": 384,
    "patch_size": 4,
    "embed_dim": 8,
    "depths": [2, 2, 2, 2],
    "num_heads": [1, 2, 2, 4],
    "window_size": 12,
    "mlp_ratio": 4.0,
    "swin_norm_eps": 1.0e-5,
    "representation_dim": 512,
    "num_classes": 7,
    "head_layers": 2,
    "head_hidden_size": 32,
    "head_heads": 4,
    "head_intermediate_size": 64,
    "head_norm_eps": 1.0e-12,
}
TAGS = ["cat", "dog", "tree", "sky", "building", "flower", "3D CG rendering"]
TAG_THRESHOLD = 0.5
DAPE_RANK = 8
TOKENIZER_MAX_LENGTH = 77
TEXT_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    # attention at the lower resolution only: the full-resolution one costs seconds on a CPU
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [1, 2],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
CONTROLNET_EMBEDDING = [8, 8, 16, 16]
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "scaling_factor": 0.18215,
}
# SD2-base's scheduler/scheduler_config.json
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# width, height: below the official minimum side (--process_size / 4), so the script enlarges it first
LR_SIZE = (14, 12)
# the random cross-attention outputs (text, RAM representation) this much stronger: see `redraw`
CROSS_ATTENTION_GAIN = 8.0


def redraw(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Unit-variance re-draw of every parameter, in named order (deterministic for a seed); the outputs
    of cross-attention (text and RAM representation) CROSS_ATTENTION_GAIN times stronger, so that the
    conditioning visibly moves the tiny model's output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                gain = CROSS_ATTENTION_GAIN if name.endswith("attn2.to_out.0.weight") else 1.0
                p.copy_(gain * noise / math.sqrt(p[0].numel()))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.01 * noise)
            else:
                p.copy_(0.01 * noise)


def _set_class_name(folder: Path, name: str) -> None:
    """The official classes are the SeeSR forks named like diffusers' own: their saves say so."""
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _prefix_text_model(file: Path) -> None:
    """SD2-base's text encoder file names its weights `text_model.*` (transformers 4's layout, which
    transformers 5 reads too); a transformers 5 save leaves the prefix out."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    save_file(
        {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()},
        str(file),
        metadata={"format": "pt"},
    )


def lr_image(width: int, height: int, generator: torch.Generator) -> Image.Image:
    """A smooth coloured pattern with a few edges and some noise: 8-bit RGB."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * x + 4 * y)])
    rgb[:, height // 4 : height // 2, width // 3 : 2 * width // 3] = torch.tensor([0.9, 0.2, 0.1])[
        :, None, None
    ]
    rgb[:, ::2, ::3] = 1 - rgb[:, ::2, ::3]  # fine detail that each resizing filter renders differently
    rgb = (rgb + 0.1 * torch.randn(rgb.shape, generator=generator)).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def write_official_layout(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny official-layout folders under `root`; returns their paths by name."""
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    from addsr_pl.models.diffusion import character_tokenizer
    from addsr_pl.models.ram import RAM
    from addsr_pl.models.seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module constructors draw their (overwritten) initial values

    sd2 = root / "stable-diffusion-2-base"
    tokenizer = character_tokenizer(sd2 / "tokenizer", TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(sd2 / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            hidden_act="gelu",
            **TEXT_ENCODER,
        )
    )
    redraw(text_encoder, generator)
    text_encoder.save_pretrained(sd2 / "text_encoder", safe_serialization=True)
    _prefix_text_model(sd2 / "text_encoder" / "model.safetensors")
    vae = AutoencoderKL(**VAE)
    redraw(vae, generator)
    vae.save_pretrained(sd2 / "vae", safe_serialization=True)
    (sd2 / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd2 / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    CLIPImageProcessor().save_pretrained(sd2 / "feature_extractor")

    addsr = root / "addsr"
    unet = SeeSRUNet2DConditionModel(**UNET, use_image_cross_attention=True, image_cross_attention_dim=512)
    controlnet = SeeSRControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING
    )
    for name, model, official in (
        ("unet", unet, "UNet2DConditionModel"),
        ("controlnet", controlnet, "ControlNetModel"),
    ):
        redraw(model, generator)
        model.save_pretrained(addsr / name, safe_serialization=True)
        _set_class_name(addsr / name, official)

    ram_folder = root / "ram"
    ram_folder.mkdir(parents=True, exist_ok=True)
    ram = RAM(**RAM_ARCHITECTURE)
    redraw(ram, generator)
    with torch.no_grad():  # RAM's label embeddings are word vectors of unit scale
        ram.label_embed.copy_(torch.randn(ram.label_embed.shape, generator=generator))
    torch.save({"model": ram.state_dict()}, ram_folder / "ram_swin_large_14m.pth")
    (ram_folder / "ram_tag_list.txt").write_text("\n".join(TAGS) + "\n")
    (ram_folder / "ram_tag_list_threshold.txt").write_text("\n".join([str(TAG_THRESHOLD)] * len(TAGS)) + "\n")

    dape = {}
    for name, module in ram.named_modules():
        if name.startswith("visual_encoder.") and name.endswith("attn.qkv"):
            dim = module.in_features  # LoRA on the query and value rows (loralib MergedLinear)
            shapes = ((2 * DAPE_RANK, dim), (2 * dim, DAPE_RANK))
        elif name.startswith("tagging_head.") and name.endswith(
            ("crossattention.self.query", "crossattention.self.key")
        ):
            shapes = ((DAPE_RANK, module.in_features), (module.out_features, DAPE_RANK))
        else:
            continue
        for part, shape in zip(("lora_A", "lora_B"), shapes):
            dape[f"{name}.{part}"] = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    torch.save(dape, root / "DAPE.pth")

    images = root / "lr"
    images.mkdir(parents=True, exist_ok=True)
    lr_image(*LR_SIZE, generator).save(images / "tiny.png")
    return {
        "sd2": sd2,
        "addsr": addsr,
        "ram": ram_folder,
        "dape": root / "DAPE.pth",
        "images": images,
        "architecture": RAM_ARCHITECTURE,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_official_layout(args.out, args.seed))
