"""Loading SD2 components from a diffusers-layout folder and ViT weights from local files."""

import pytest
import timm
import torch
from hydra.utils import instantiate

from addsr_pl.models.diffusion import MissingWeightsError, load_sd2_components
from addsr_pl.models.discriminator import _load_timm_weights

from conftest import to_dicts


@pytest.fixture
def sd2_folder(make_cfg, tmp_path):
    """The tiny components saved in SD2's diffusers layout."""
    components = instantiate(to_dicts(make_cfg())["model"]["components"], _convert_="all")
    root = tmp_path / "sd2"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(components, name).save_pretrained(root / name)
    components.controlnet.save_pretrained(tmp_path / "teacher" / "controlnet")
    return root, components


def test_sd2_folder_loads_every_component_with_its_weights(sd2_folder, tmp_path):
    root, reference = sd2_folder
    loaded = load_sd2_components(str(root), controlnet_path=str(tmp_path / "teacher"))
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.tokenizer("a cat").input_ids == reference.tokenizer("a cat").input_ids
    assert torch.equal(loaded.scheduler.alphas_cumprod, reference.scheduler.alphas_cumprod)
    assert loaded.sources["vae"] == str(root) and loaded.sources["controlnet"] == str(tmp_path / "teacher")


def test_without_a_teacher_controlnet_one_is_made_from_the_unet(sd2_folder):
    root, _ = sd2_folder
    loaded = load_sd2_components(str(root))
    assert torch.equal(loaded.controlnet.conv_in.weight, loaded.unet.conv_in.weight)
    assert loaded.sources["controlnet"] is None


@pytest.mark.parametrize("missing", ["vae/config.json", "tokenizer/tokenizer_config.json"])
def test_each_missing_sd2_part_is_named(sd2_folder, missing):
    root, _ = sd2_folder
    (root / missing).unlink()
    with pytest.raises(MissingWeightsError, match=f"{missing}.*model.components.pretrained_path"):
        load_sd2_components(str(root))


def test_vit_weights_load_from_a_local_release_file(tmp_path):
    spec = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    source = timm.create_model("vit_small_patch16_224", pretrained=False, **spec)
    path = tmp_path / "dino.pth"
    torch.save(source.state_dict(), path)
    target = timm.create_model("vit_small_patch16_224", pretrained=False, **spec)
    _load_timm_weights(target, str(path), "model.discriminator.backbone_weights")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    torch.save({"blocks.0.unexpected": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="does not fit the configured ViT"):
        _load_timm_weights(target, str(path), "model.discriminator.backbone_weights")
