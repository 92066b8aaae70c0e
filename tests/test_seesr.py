"""SeeSR UNet / ControlNet: image cross-attention, layer order, folder loading, hybrid loading."""

import re
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy

import pytest
import torch
from diffusers import UNet2DConditionModel

from addsr_pl.core.sampler import Denoiser
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.seesr import (
    SeeSRControlNetModel,
    SeeSRUNet2DConditionModel,
)

IMAGE_DIM = 12
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    use_linear_projection=True,
)


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    config = {
        **TINY_UNET,
        "use_image_cross_attention": True,
        "image_cross_attention_dim": IMAGE_DIM,
        **overrides,
    }
    return SeeSRUNet2DConditionModel(**config).eval()


def inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([5, 600][:batch]),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
        image=torch.randn(batch, 7, IMAGE_DIM, generator=g),
        control=torch.rand(batch, 3, 64, 64, generator=g),
    )


def unet_out(unet, x, image):
    return unet(
        x["sample"],
        x["timestep"],
        encoder_hidden_states=x["encoder_hidden_states"],
        return_dict=False,
        image_encoder_hidden_states=image,
    )[0]


def test_seesr_image_attentions_sit_where_seesr_puts_them():
    unet = tiny_unet()
    entries = {
        re.match(r"(.*image_attentions\.\d+)\.", k).group(1) for k in unet.state_dict() if "image_att" in k
    }
    assert entries == {
        "down_blocks.0.image_attentions.0",
        "mid_block.image_attentions.0",
        "up_blocks.1.image_attentions.0",
        "up_blocks.1.image_attentions.1",
    }
    to_k = unet.down_blocks[0].image_attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert to_k.shape == (32, IMAGE_DIM)  # cross-attends to the representation, not the text


def test_seesr_output_depends_on_the_representation():
    unet = tiny_unet()
    x = inputs()
    with torch.no_grad():
        a = unet_out(unet, x, x["image"])
        b = unet_out(unet, x, x["image"])
        c = unet_out(unet, x, x["image"] + 1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_seesr_layer_order_is_resnet_text_image():
    unet = tiny_unet()
    calls = []
    for name, module in unet.named_modules():
        if re.fullmatch(
            r"(down_blocks\.\d|mid_block|up_blocks\.\d)\.(resnets|attentions|image_attentions)\.\d", name
        ):
            module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    with torch.no_grad():
        unet_out(unet, inputs(), inputs()["image"])
    assert calls == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0",
        "down_blocks.0.image_attentions.0",
        "down_blocks.1.resnets.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0",
        "mid_block.image_attentions.0",
        "mid_block.resnets.1",
        "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.1",
        "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.image_attentions.0",
        "up_blocks.1.resnets.1",
        "up_blocks.1.attentions.1",
        "up_blocks.1.image_attentions.1",
    ]


def test_seesr_image_attention_consumes_the_text_attention_output():
    """The image attention's input is exactly what the text attention produced, and its output goes on."""
    unet = tiny_unet()
    seen = {}
    block = unet.down_blocks[0]
    # prepend: run before the hook that applies the image attention, i.e. see the text attention's own output
    block.attentions[0].register_forward_hook(
        lambda m, a, o: seen.__setitem__("text_out", o[0]), prepend=True
    )
    block.image_attentions[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("image_in", a[0]))
    block.image_attentions[0].register_forward_hook(lambda m, a, o: seen.__setitem__("image_out", o[0]))
    block.downsamplers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("downsampler_in", a[0]))
    with torch.no_grad():
        unet_out(unet, inputs(), inputs()["image"])
    assert torch.equal(seen["text_out"], seen["image_in"])
    assert torch.equal(seen["image_out"], seen["downsampler_in"])


def test_seesr_representation_presence_must_match_the_flag():
    x = inputs()
    with pytest.raises(ValueError, match="image_encoder_hidden_states"):
        unet_out(tiny_unet(), x, None)
    plain = tiny_unet(use_image_cross_attention=False)
    assert not any("image_attentions" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="use_image_cross_attention=False"):
        unet_out(plain, x, x["image"])
    assert unet_out(plain, x, None).shape == x["sample"].shape


def test_seesr_folder_round_trip(tmp_path):
    unet = tiny_unet()
    controlnet = SeeSRControlNetModel.from_unet(unet).eval()
    unet.save_pretrained(tmp_path / "unet")
    controlnet.save_pretrained(tmp_path / "controlnet")
    unet2, info = SeeSRUNet2DConditionModel.from_pretrained(
        tmp_path, subfolder="unet", output_loading_info=True
    )
    controlnet2, info2 = SeeSRControlNetModel.from_pretrained(
        tmp_path, subfolder="controlnet", output_loading_info=True
    )
    for loading in (info, info2):
        assert loading["missing_keys"] == [] and loading["unexpected_keys"] == []
    assert unet2.config.use_image_cross_attention and controlnet2.config.use_image_cross_attention
    assert unet2.config.image_cross_attention_dim == IMAGE_DIM
    x = inputs()
    with torch.no_grad():
        assert torch.equal(unet_out(unet, x, x["image"]), unet_out(unet2.eval(), x, x["image"]))


def test_seesr_controlnet_from_unet_copies_image_attentions():
    unet = tiny_unet()
    controlnet = SeeSRControlNetModel.from_unet(unet)
    assert controlnet.config.use_image_cross_attention
    unet_state = unet.state_dict()
    copied = {
        k: v for k, v in controlnet.state_dict().items() if k.startswith(("down_blocks.", "mid_block."))
    }
    assert any(".image_attentions." in k for k in copied)
    for key, value in copied.items():
        assert torch.equal(value, unet_state[key]), key
    plain = SeeSRControlNetModel.from_unet(unet, use_image_cross_attention=False)
    assert not any("image_attentions" in k for k in plain.state_dict())


def test_seesr_denoiser_passes_the_representation_to_both_models():
    unet = tiny_unet()
    controlnet = SeeSRControlNetModel.from_unet(unet)
    with torch.no_grad():  # the zero-initialised ControlNet outputs would hide its image attentions
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    denoiser = Denoiser(unet, controlnet.eval())
    x = inputs()
    with torch.no_grad():
        a = denoiser(
            x["sample"], x["timestep"], x["control"], Conditioning(x["encoder_hidden_states"], x["image"])
        )
        unet.down_blocks[0].image_attentions[0].proj_out.weight.zero_()  # the ControlNet's copy still matters
        b = denoiser(
            x["sample"], x["timestep"], x["control"], Conditioning(x["encoder_hidden_states"], x["image"])
        )
        controlnet.down_blocks[0].image_attentions[0].proj_out.weight.zero_()
        c = denoiser(
            x["sample"], x["timestep"], x["control"], Conditioning(x["encoder_hidden_states"], x["image"])
        )
    assert (a - b).abs().max() > 1e-5 and (b - c).abs().max() > 1e-5


def _save_plain_sd_unet(folder, seed):
    torch.manual_seed(seed)
    sd = UNet2DConditionModel(**TINY_UNET)
    sd.save_pretrained(folder / "unet")
    return sd.state_dict()


def test_seesr_hybrid_loading_takes_image_attentions_from_seesr(tmp_path):
    sd_state = _save_plain_sd_unet(tmp_path / "sd", seed=3)
    seesr = tiny_unet(seed=4, image_cross_attention_dim=512)
    seesr.save_pretrained(tmp_path / "seesr" / "unet")
    hybrid = SeeSRUNet2DConditionModel.from_sd_and_seesr(tmp_path / "sd", tmp_path / "seesr")
    seesr_state = seesr.state_dict()
    for key, value in hybrid.state_dict().items():
        source = seesr_state if ".image_attentions." in key else sd_state
        assert torch.equal(value, source[key]), key
    fresh = SeeSRUNet2DConditionModel.from_sd_and_seesr(tmp_path / "sd", None)
    assert fresh.config.use_image_cross_attention
    for key, value in fresh.state_dict().items():
        if ".image_attentions." not in key:
            assert torch.equal(value, sd_state[key]), key


def test_seesr_hybrid_loading_names_missing_files(tmp_path):
    _save_plain_sd_unet(tmp_path / "sd", seed=3)
    expected = tmp_path / "nowhere" / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(expected)):
        SeeSRUNet2DConditionModel.from_sd_and_seesr(tmp_path / "sd", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SeeSRUNet2DConditionModel.from_sd_and_seesr(tmp_path / "nowhere", None)


def test_seesr_deepcopy_keeps_each_copy_on_its_own_image_attentions():
    """EMA copies are deep copies: the copy's hooks must drive the copy's image attentions."""
    unet = tiny_unet()
    copy = deepcopy(unet)
    x = inputs()
    with torch.no_grad():
        before = unet_out(unet, x, x["image"])
        copy.down_blocks[0].image_attentions[0].proj_out.weight.zero_()
        assert torch.equal(unet_out(unet, x, x["image"]), before)
        assert (unet_out(copy, x, x["image"]) - before).abs().max() > 1e-5


def test_seesr_concurrent_calls_keep_their_own_representation():
    unet = tiny_unet()
    x = inputs()
    representations = [x["image"] * s for s in (1.0, -1.0, 2.0, 0.5)]
    with torch.no_grad():
        expected = [unet_out(unet, x, r) for r in representations]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda r: unet_out(unet, x, r), representations * 3))
    for i, result in enumerate(results):
        assert torch.equal(result, expected[i % 4])


def test_seesr_gradient_checkpointing_trains_the_image_attentions():
    unet = tiny_unet().train()
    unet.enable_gradient_checkpointing()
    x = inputs()
    unet_out(unet, x, x["image"]).square().mean().backward()
    grads = [p.grad for n, p in unet.named_parameters() if ".image_attentions." in n]
    assert grads and all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads if g.ndim == 2)
