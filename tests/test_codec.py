"""The lossless pixel-unshuffle codec: SD's geometry, exact round trip, saved and loaded like a VAE."""

import pytest
import torch

from addsr_pl.config import ConfigError, validate
from addsr_pl.models.diffusion import tiny_codec
from addsr_pl.models.vae import PixelUnshuffleCodec, VaeCodec

LOSSLESS = ["model.components.codec=pixel_unshuffle", "model.components.unet.in_channels=192",
            "model.components.unet.out_channels=192"]  # fmt: skip


def test_it_reproduces_every_image_exactly_at_sd_s_factor(sample_pair):
    hr, _ = sample_pair
    codec = VaeCodec(PixelUnshuffleCodec(3, 8, scaling_factor=2.5))
    latents = codec.encode(hr)
    assert latents.shape == (1, 192, 8, 8) and codec.scale_factor == 8 and codec.latent_channels == 192
    assert codec.lossless
    # the scaling factor multiplies the latents (SD's convention) and decoding undoes it
    assert torch.allclose(latents.std(), (hr * 2 - 1).std() * 2.5, rtol=1e-5)
    assert torch.allclose(codec.decode(latents), hr, atol=1e-6)


def test_it_is_saved_as_a_config_and_loaded_back(tmp_path):
    PixelUnshuffleCodec(3, 8, scaling_factor=1.7).save_pretrained(tmp_path / "vae")
    loaded = PixelUnshuffleCodec.from_pretrained(tmp_path, subfolder="vae")
    assert (loaded.config.factor, loaded.config.scaling_factor) == (8, 1.7)


def test_a_unet_whose_channels_do_not_match_the_codec_is_refused_naming_the_fix():
    vae = {"in_channels": 3, "block_out_channels": [8, 16, 32, 64], "scaling_factor": 1.0}
    with pytest.raises(ValueError, match=r"unet.in_channels = 4.*set model.components.unet.in_channels=192"):
        tiny_codec("pixel_unshuffle", vae, {"in_channels": 4, "out_channels": 4})
    with pytest.raises(ValueError, match="must be one of vae, pixel_unshuffle"):
        tiny_codec("jpeg", vae, {"in_channels": 4, "out_channels": 4})


def test_the_codec_key_is_checked_at_start_up(make_cfg):
    with pytest.raises(ConfigError, match="model.components.codec = 'lossless': must be one of"):
        validate(make_cfg(["model.components.codec=lossless"]))


@pytest.mark.slow
def test_a_student_trained_with_it_upscales_and_never_tiles_the_codec(make_cfg, tmp_path):
    from addsr_pl.inference.pipeline import AddSRPipeline
    from addsr_pl.train import train

    cfg = make_cfg([*LOSSLESS, "data.crop_size=64", "trainer.max_steps=1", "trainer.limit_val_batches=0"])
    student = train(cfg)["student"]
    pipeline = AddSRPipeline.from_folder(student)
    assert isinstance(pipeline.codec.vae, PixelUnshuffleCodec)
    tiled = pipeline.with_tiling(256, 256, {"vae_tile_size": 64, "vae_overlap": 16, "vae_padding": 8,
                                            "vae_stats_size": None, "vae_statistics": "estimate",
                                            "latent_tile_size": 64, "latent_overlap": 8,
                                            "latent_tile_batch_size": 1, "latent_weight_sigma": 0.25})  # fmt: skip
    assert tiled.plan.vae_tile_size is None and tiled.codec is pipeline.codec
    sr = tiled(torch.rand(1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 256, 256) and torch.isfinite(sr).all()
