"""Loading SD2 components from a diffusers-layout folder and ViT weights from local files."""

import subprocess
import sys

import pytest
import timm
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from addsr_pl.models.diffusion import (
    MissingWeightsError,
    WeightsMismatchError,
    load_sd2_components,
    load_seesr_components,
)
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


@pytest.fixture
def seesr_folder(make_cfg, tmp_path):
    """A tiny SeeSR teacher (UNet and ControlNet with image attentions) saved like SeeSR's release."""
    components = instantiate(to_dicts(make_cfg(["model=tiny_seesr"]))["model"]["components"], _convert_="all")
    root = tmp_path / "seesr"
    components.unet.save_pretrained(root / "unet")
    components.controlnet.save_pretrained(root / "controlnet")
    return root


@pytest.mark.parametrize("key", ["unet_path", "controlnet_path"])
def test_seesr_weights_through_the_plain_classes_are_refused(make_cfg, seesr_folder, key):
    """diffusers' plain classes would drop every `image_attentions` weight with a warning only."""
    cfg = to_dicts(make_cfg([f"model.components.{key}={seesr_folder}"]))["model"]["components"]
    sub = key.removesuffix("_path")
    with pytest.raises(InstantiationException) as error:
        instantiate(cfg, _convert_="all")
    assert isinstance(error.value.__cause__, WeightsMismatchError)
    message = str(error.value.__cause__)
    assert str(seesr_folder / sub) in message and "image_attentions" in message
    assert "model=sd2_seesr conditioning=ram" in message and "\n" not in message


def test_sd2_loader_refuses_a_seesr_unet(sd2_folder, seesr_folder):
    root, _ = sd2_folder
    with pytest.raises(WeightsMismatchError, match=r"unused \(e\.g\. .*image_attentions.*model=sd2_seesr"):
        load_sd2_components(str(root), unet_path=str(seesr_folder), controlnet_path=str(seesr_folder))


def test_seesr_loader_refuses_plain_weights(sd2_folder, tmp_path):
    root, components = sd2_folder
    components.unet.save_pretrained(tmp_path / "plain" / "unet")
    components.controlnet.save_pretrained(tmp_path / "plain" / "controlnet")
    with pytest.raises(WeightsMismatchError, match=r"plain/unet.*not a SeeSR unet.*model=sd2"):
        load_seesr_components(str(root), str(tmp_path / "plain"))


def test_train_names_the_fix_in_one_line(make_cfg, seesr_folder, tmp_path):
    """The documented command's mistake (SeeSR folders under the plain model) ends in one line, rc 2."""
    run_dir = tmp_path / "cli_run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "addsr_pl.train",
            "model=tiny",
            "data=sample",
            "trainer=cpu",
            f"model.components.unet_path={seesr_folder}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}",
            "trainer.max_steps=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "model=sd2_seesr" in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("key", "what"), [("unet_path", "teacher UNet"), ("controlnet_path", "teacher ControlNet")]
)
def test_a_teacher_folder_without_its_network_names_the_file_and_the_key(sd2_folder, tmp_path, key, what):
    root, _ = sd2_folder
    sub = key.removesuffix("_path")
    with pytest.raises(MissingWeightsError) as error:
        load_sd2_components(str(root), **{key: str(tmp_path / "empty")})
    message = str(error.value)
    assert f"{what} ({sub}/config.json)" in message and str(tmp_path / "empty" / sub) in message
    assert f"model.components.{key}" in message and "\n" not in message
