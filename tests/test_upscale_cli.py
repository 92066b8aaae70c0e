"""`addsr-pl upscale` over generated files: formats, metadata, failures, folders."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.upscale import main, parser, settings_from


def photo(h=12, w=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, channels))
    return np.clip(base + rng.normal(0, 20, (h, w, channels)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "nested" / "deeper").mkdir(parents=True)
    rgba = np.concatenate(
        [photo(), np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (12, 1))[..., None]], axis=2
    )
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    sixteen = (photo(channels=1)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "gray16.png")
    Image.fromarray(photo()[..., 0], "L").save(root / "nested" / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(photo(12, 20)).save(root / "nested" / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(photo()).convert("CMYK").save(root / "nested" / "deeper" / "cmyk.jpg")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(photo()).save(root / "icc.png", icc_profile=srgb)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return root, srgb


def test_the_cli_writes_every_readable_image_and_reports_the_corrupt_one(
    tiny_student, inputs, tmp_path, capsys
):
    root, srgb = inputs
    out = tmp_path / "out"
    code = main([str(root), "-o", str(out), "--model", tiny_student, "--steps", "2", "--no-progress"])
    assert code == 1  # the corrupt file failed
    assert "corrupt.png" in capsys.readouterr().err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        "gray16.png", "icc.png", "nested/deeper/cmyk.jpg", "nested/gray.png", "nested/rotated.jpg", "rgba.png",
    ]  # fmt: skip
    with Image.open(out / "rgba.png") as im:
        assert im.mode == "RGBA" and im.size == (64, 48)
        alpha = np.asarray(im)[..., 3].astype(float)
        assert alpha[:, 0].mean() < 30 and alpha[:, -1].mean() > 225  # the horizontal alpha ramp survived
    with Image.open(out / "gray16.png") as im:
        assert im.mode.startswith("I") and im.size == (64, 48)
        assert np.asarray(im).max() > 255  # 16-bit values, not 8-bit ones
    with Image.open(out / "nested" / "gray.png") as im:
        assert im.mode == "L" and im.size == (64, 48)
    with Image.open(out / "nested" / "rotated.jpg") as im:
        assert im.size == (48, 80)  # 20x12 stored, shown rotated: 12x20, times 4
        assert im.getexif().get(0x0112, 1) == 1
    with Image.open(out / "nested" / "deeper" / "cmyk.jpg") as im:
        assert im.mode == "RGB" and im.size == (64, 48)
    with Image.open(out / "icc.png") as im:
        assert im.info.get("icc_profile") == srgb


def test_skip_existing_and_suffix(tiny_student, inputs, tmp_path):
    root, _ = inputs
    out = tmp_path / "out"
    args = [str(root / "icc.png"), "-o", str(out), "--model", tiny_student, "--steps", "1", "--no-progress"]
    assert main([*args, "--suffix", "_x4"]) == 0
    target = out / "icc_x4.png"
    stamp = target.stat().st_mtime_ns
    assert main([*args, "--suffix", "_x4", "--skip-existing"]) == 0
    assert target.stat().st_mtime_ns == stamp


def test_bad_arguments_exit_2(tiny_student, inputs, tmp_path):
    root, _ = inputs
    base = [str(root / "icc.png"), "-o", str(tmp_path / "o.png"), "--no-progress"]
    assert main([*base, "--model", tiny_student, "--steps", "7"]) == 2
    assert main([*base, "--model", tiny_student, "--psr-weight", "1.5"]) == 2
    assert main([*base, "--model", str(tmp_path / "no_model")]) == 2


def test_outscale_resizes_the_x4_result(tiny_student, inputs, tmp_path):
    root, _ = inputs
    target = tmp_path / "two.png"
    assert (
        main(
            [
                str(root / "icc.png"),
                "-o",
                str(target),
                "--model",
                tiny_student,
                "--outscale",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    with Image.open(target) as im:
        assert im.size == (32, 24)


TILES = {
    # latent cells: the tiny VAE's latent is 1/8 of the image, so a 192 px output is 24 x 24 cells
    "latent_tile_size": 16,
    "latent_overlap": 8,
    "vae_tile_size": 128,
    "vae_overlap": 32,
    "vae_padding": 32,
    "vae_statistics": "exact",
}


def test_tiled_and_untiled_outputs_agree(tiny_student):
    """An image that fits untiled, run through latent (2x2) and VAE tiling: the same output within
    tolerance. With exact GroupNorm statistics the VAE tiles are exact; the Gaussian-blended latent
    tiles differ where a tile's self-attention sees less context (measured with the 1/8 tiny VAE's
    16-cell tiles: mean 0.010, max 0.12)."""
    settings = settings_from(parser().parse_args(["x", "-o", "y", "--model", "m", "--steps", "2"]))
    settings["color_fix"] = "none"
    pipeline = AddSRPipeline.from_folder(tiny_student)
    lr = torch.from_numpy(photo(48, 48)).permute(2, 0, 1)[None].float() / 255
    untiled = Upscaler(pipeline, settings).upscale_tensor(lr)
    settings["tiling"] |= TILES
    tiled_upscaler = Upscaler(pipeline, settings)
    assert pipeline.with_tiling(192, 192, settings["tiling"]).plan.latent_grid == (2, 2)
    tiled = tiled_upscaler.upscale_tensor(lr)
    assert tiled.shape == untiled.shape == (1, 3, 192, 192)
    assert pipeline.with_tiling(192, 192, settings["tiling"]).plan.vae_grid == (2, 2)
    difference = (tiled - untiled).abs()
    assert difference.mean() < 0.015 and difference.max() < 0.2


def test_no_step_at_tile_borders_on_a_smooth_gradient(tiny_student):
    """On a smooth horizontal gradient, the tiled output's column-to-column steps (tile borders
    included) exceed the untiled output's by at most 0.02 anywhere."""
    settings = settings_from(parser().parse_args(["x", "-o", "y", "--model", "m", "--steps", "1"]))
    settings["color_fix"] = "none"
    pipeline = AddSRPipeline.from_folder(tiny_student)
    ramp = torch.linspace(0.2, 0.8, 32)
    lr = (ramp[None, :] * torch.ones(32, 1)).expand(3, 32, 32)[None].contiguous()
    untiled = Upscaler(pipeline, settings).upscale_tensor(lr)[0]
    settings["tiling"] |= TILES
    tiled = Upscaler(pipeline, settings).upscale_tensor(lr)[0]

    def column_steps(image):
        return (image[:, :, 1:] - image[:, :, :-1]).abs().mean(dim=(0, 1))

    assert (column_steps(tiled) - column_steps(untiled)).abs().max() < 0.02


def test_too_small_images_are_refused_with_the_fix(tiny_student, tmp_path):
    Image.fromarray(photo(4, 4)).save(tmp_path / "tiny.png")
    out = tmp_path / "out"
    assert (
        main([str(tmp_path / "tiny.png"), "-o", str(out / "t.png"), "--model", tiny_student, "--no-progress"])
        == 1
    )
