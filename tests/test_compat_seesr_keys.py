"""Full-size SeeSR UNet / ControlNet (SD2 sizes, meta device) have exactly the official key names and shapes.

The reference lists in tests/data/compat/ were written from SeeSR's own classes (see docs/compatibility.md).
"""

import json
from pathlib import Path

import torch

from addsr_pl.models.seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

COMPAT = Path(__file__).parent / "data" / "compat"

# stabilityai/stable-diffusion-2-base unet/config.json, plus SeeSR's flag
SD2_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    use_image_cross_attention=True,
)


def key_shapes(state_dict):
    return [f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in state_dict.items()]


def reference(name):
    return (COMPAT / name).read_text().splitlines()


def test_compat_seesr_sd2_unet_and_controlnet_keys_match_the_official_classes():
    with torch.device("meta"):
        unet = SeeSRUNet2DConditionModel(**SD2_UNET)
        controlnet = SeeSRControlNetModel.from_unet(unet, load_weights_from_unet=False)
    assert sorted(key_shapes(unet.state_dict())) == sorted(reference("seesr_unet_sd2_keys.txt"))
    assert sorted(key_shapes(controlnet.state_dict())) == sorted(reference("seesr_controlnet_sd2_keys.txt"))
    image_params = sum(v.numel() for k, v in unet.state_dict().items() if ".image_attentions." in k)
    assert image_params == 260_849_600  # 15 entries of 20 C^2 + 1045 C


def test_compat_seesr_folder_in_the_official_format_loads_without_missing_keys(tmp_path):
    """A folder as SeeSR writes it: diffusers 0.21 class names, no image_cross_attention_dim (hard-coded 512)."""
    tiny = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        use_image_cross_attention=True,
    )
    unet = SeeSRUNet2DConditionModel(**tiny)
    controlnet = SeeSRControlNetModel.from_unet(unet)
    for name, model, official_class in (
        ("unet", unet, "UNet2DConditionModel"),
        ("controlnet", controlnet, "ControlNetModel"),
    ):
        model.save_pretrained(tmp_path / name)
        config_file = tmp_path / name / "config.json"
        config = json.loads(config_file.read_text())
        del config["image_cross_attention_dim"]
        config.update(_class_name=official_class, _diffusers_version="0.21.4")
        config_file.write_text(json.dumps(config))
    unet2, info = SeeSRUNet2DConditionModel.from_pretrained(
        tmp_path, subfolder="unet", output_loading_info=True
    )
    controlnet2, info2 = SeeSRControlNetModel.from_pretrained(
        tmp_path, subfolder="controlnet", output_loading_info=True
    )
    for loading in (info, info2):
        assert loading["missing_keys"] == [] and loading["unexpected_keys"] == []
    assert unet2.config.image_cross_attention_dim == 512 and controlnet2.config.use_image_cross_attention
    key = "down_blocks.0.image_attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(unet2.state_dict()[key], unet.state_dict()[key])
