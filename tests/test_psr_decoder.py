"""stage=psr_decoder: the small decoder learns the VAE decoder and is exported into the student."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from addsr_pl.config import ConfigError
from addsr_pl.core.student_format import MANIFEST
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.models.psr_decoder import PsrDecoder, build_tiny_autoencoder
from addsr_pl.train import train

FAST = ["data.crop_size=32", "trainer.limit_val_batches=0", "method.architecture.channels=16",
        "method.architecture.blocks_per_stage=1"]  # fmt: skip


@pytest.mark.parametrize("scale_factor", [2, 8])
def test_the_small_decoder_upsamples_by_the_vae_factor(scale_factor):
    decoder = PsrDecoder(build_tiny_autoencoder(scale_factor, 4, 8, 1))
    assert decoder.scale_factor == scale_factor
    image = decoder.decode(torch.randn(2, 4, 5, 6))
    assert image.shape == (2, 3, 5 * scale_factor, 6 * scale_factor)
    with pytest.raises(ValueError, match="power of two"):
        build_tiny_autoencoder(6, 4, 8, 1)


def test_stage_distils_the_vae_decoder_and_exports_it_into_the_student(make_cfg, tiny_student, tmp_path):
    student = tmp_path / "student"  # a copy: the session's student stays without a small decoder
    shutil.copytree(tiny_student, student)
    cfg = make_cfg(["stage=psr_decoder", *FAST, "trainer.max_steps=1"], sub="short")
    short = train(cfg)
    cfg = make_cfg(["stage=psr_decoder", *FAST, "trainer.max_steps=40", f"student_dir={student}"],
                   sub="long")  # fmt: skip
    result = train(cfg)
    datamodule = result["datamodule"]
    module, batch = result["module"], datamodule.degrade(next(iter(datamodule.train_dataloader())))

    def psnr(m):
        with torch.no_grad():
            latents, target = module.latents_and_targets(batch)
            mse = (m.decoder.decode(latents).clamp(0, 1) - target.clamp(0, 1)).pow(2).mean()
        return float(-10 * torch.log10(mse))

    assert psnr(module) > psnr(short["module"]) + 3  # it learns the VAE decoder
    manifest = json.loads((student / MANIFEST).read_text())
    assert manifest["components"]["psr_decoder"]["path"] == "psr_decoder"
    pipeline = AddSRPipeline.from_folder(student)
    assert pipeline.psr_decoder is not None
    trained = module.decoder.autoencoder.decoder.state_dict()
    for key, value in pipeline.psr_decoder.autoencoder.decoder.state_dict().items():
        assert torch.equal(value, trained[key].float())
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = pipeline.run(lr, steps=2, generator=torch.Generator().manual_seed(0))  # tiny is the default
    w = pipeline.psr_weight
    expected = (
        w * pipeline.psr_decoder.decode(steps[0].x0_latent).clamp(0, 1) + (1 - w) * steps[0].control_image
    )
    torch.testing.assert_close(steps[1].control_image, expected)


def test_a_student_dir_without_a_manifest_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(["stage=psr_decoder", *FAST, f"student_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="student_dir"):
        train(cfg)
