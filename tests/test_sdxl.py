"""The SDXL adapter's own parts on `model=sdxl_tiny`: the packed prompt's pooled projection reaches the
networks, whose added time ids follow the image size, and the loader's errors (the README flow: tests/test_backbones.py)."""

import pytest
import torch

from addsr_pl.method.module import AddSRModule
from addsr_pl.models.backbones.sdxl import load_sdxl_components
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.diffusion import MissingWeightsError

from conftest import compose_train, to_dicts


def test_the_pooled_projection_conditions_the_denoiser_at_any_image_size(tmp_path, cache_dir):
    module = AddSRModule(**to_dicts(compose_train(tmp_path, ["model=sdxl_tiny"], cache_dir)))
    embeds = module.conditioner.prompt_encoder.encode(["a cat"])
    assert embeds.shape == (
        1,
        16 + 1,
        64,
    )  # both CLIPs side by side, then the pooled projection (32) as a token
    z, t, control = torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.rand(1, 3, 32, 32)
    other_pooled = embeds.clone()
    other_pooled[:, -1] += 1
    with torch.no_grad():
        plain = module.teacher(z, t, control, Conditioning(embeds))
        pooled = module.teacher(z, t, control, Conditioning(other_pooled))
        # a larger image: time ids (and the UNet) see 64 x 64 pixels; the top-left corner is compared
        larger = module.teacher(
            torch.nn.functional.pad(z, (0, 4, 0, 4)),
            t,
            torch.nn.functional.pad(control, (0, 32, 0, 32)),
            Conditioning(embeds),
        )
    assert not torch.allclose(plain, pooled)
    assert larger.shape == (1, 4, 8, 8)


def test_the_loader_names_every_missing_file_and_the_key(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError) as error:
        load_sdxl_components(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "model.components.pretrained_path" in message
    assert "text_encoder_2/config.json" in message and "scheduler/scheduler_config.json" in message
    assert "unet/config.json" not in message
