"""Image I/O round trips over files generated here: alpha, 16-bit, gray, EXIF, CMYK, palette, ICC."""

import functools

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageOps

from addsr_pl.inference.io import (
    ImageReadError,
    encode_png16,
    list_images,
    output_path,
    plan_outputs,
    read_image,
    upscale_alpha,
    write_image,
)

RNG = np.random.default_rng(0)


@functools.cache
def _srgb_profile() -> bytes:
    """One sRGB profile for the whole module: a new one carries a new creation time, so two made a
    second apart differ and a test comparing them would fail by the clock."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_rgba_png_keeps_alpha(tmp_path):
    pixels = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    loaded = read_image(tmp_path / "a.png")
    assert loaded.bit_depth == 8 and not loaded.grayscale
    assert torch.equal(loaded.rgb, torch.from_numpy(pixels[..., :3] / 255.0).permute(2, 0, 1).float())
    assert torch.equal(loaded.alpha[0], torch.from_numpy(pixels[..., 3] / 255.0).float())
    written = write_image(tmp_path / "out.png", loaded.rgb, like=loaded, alpha=loaded.alpha)
    back = Image.open(written)
    assert back.mode == "RGBA"
    assert np.array_equal(np.asarray(back), pixels)


def test_alpha_into_jpeg_falls_back_to_png(tmp_path):
    rgb = torch.rand(3, 5, 5)
    alpha = torch.rand(1, 5, 5)
    with pytest.warns(UserWarning, match="cannot hold the alpha"):
        written = write_image(tmp_path / "x.jpg", rgb, alpha=alpha)
    assert written == tmp_path / "x.png"
    assert Image.open(written).mode == "RGBA"


def test_16bit_gray_png_round_trip(tmp_path):
    values = RNG.integers(0, 65536, (9, 8), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = read_image(tmp_path / "g16.png")
    assert loaded.bit_depth == 16 and loaded.grayscale and loaded.alpha is None
    assert torch.allclose(loaded.rgb[1].double(), torch.from_numpy(values / 65535.0), atol=1e-7)
    write_image(tmp_path / "out.png", loaded.rgb, like=loaded)
    back = Image.open(tmp_path / "out.png")
    assert back.mode.startswith("I")
    assert np.array_equal(np.asarray(back).astype(np.int64), values.astype(np.int64))


def test_16bit_rgb_png_round_trip(tmp_path):
    values = RNG.integers(0, 65536, (9, 8, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), values[..., ::-1])  # cv2 writes BGR
    loaded = read_image(tmp_path / "c16.png")
    assert loaded.bit_depth == 16 and not loaded.grayscale
    expected = torch.from_numpy(values / 65535.0).permute(2, 0, 1)
    assert torch.allclose(loaded.rgb.double(), expected, atol=1e-7)
    write_image(tmp_path / "out.png", loaded.rgb, like=loaded)
    back = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert back.dtype == np.uint16 and np.array_equal(back, values)


def test_16bit_rgba_and_gray_alpha_png_encoder(tmp_path):
    rgba = RNG.integers(0, 65536, (5, 6, 4), dtype=np.uint16)
    (tmp_path / "rgba.png").write_bytes(encode_png16(rgba, icc_profile=_srgb_profile()))
    loaded = read_image(tmp_path / "rgba.png")
    assert loaded.bit_depth == 16 and loaded.icc_profile == _srgb_profile()
    assert torch.allclose(loaded.alpha[0].double(), torch.from_numpy(rgba[..., 3] / 65535.0), atol=1e-7)
    back = cv2.imread(str(tmp_path / "rgba.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back[..., [2, 1, 0, 3]], rgba)

    gray_alpha = RNG.integers(0, 65536, (5, 6, 2), dtype=np.uint16)
    (tmp_path / "la.png").write_bytes(encode_png16(gray_alpha))
    loaded = read_image(tmp_path / "la.png")
    assert loaded.grayscale and loaded.bit_depth == 16
    assert torch.allclose(loaded.rgb[0].double(), torch.from_numpy(gray_alpha[..., 0] / 65535.0), atol=1e-7)
    write_image(tmp_path / "la_out.png", loaded.rgb, like=loaded, alpha=loaded.alpha)
    assert np.array_equal(read_back_png16(tmp_path / "la_out.png"), gray_alpha)


def read_back_png16(path):
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return np.stack([data[..., 0], data[..., 3]], axis=-1)


def test_16bit_tiff_round_trip_with_icc(tmp_path):
    values = RNG.integers(0, 65536, (7, 5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", values, photometric="rgb", iccprofile=_srgb_profile())
    loaded = read_image(tmp_path / "c16.tif")
    assert loaded.bit_depth == 16 and loaded.format == "TIFF"
    write_image(tmp_path / "out.tif", loaded.rgb, like=loaded)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint16
        assert np.array_equal(page.asarray(), values)
        assert page.iccprofile == _srgb_profile()
    alpha = torch.rand(1, 7, 5)
    write_image(tmp_path / "alpha.tif", loaded.rgb, like=loaded, alpha=alpha)
    again = read_image(tmp_path / "alpha.tif")
    assert again.bit_depth == 16 and torch.allclose(again.alpha, alpha, atol=1 / 65535)
    assert torch.allclose(again.rgb, loaded.rgb)


def test_grayscale_in_grayscale_out(tmp_path):
    pixels = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "g.png")
    loaded = read_image(tmp_path / "g.png")
    assert loaded.grayscale and loaded.rgb.shape == (3, 6, 6)
    assert torch.equal(loaded.rgb[0], loaded.rgb[2])
    write_image(tmp_path / "g_out.jpg", loaded.rgb, like=loaded)
    assert Image.open(tmp_path / "g_out.jpg").mode == "L"
    write_image(tmp_path / "g_out.png", loaded.rgb, like=loaded)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g_out.png")), pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_reset(tmp_path, orientation):
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[:2, :3] = 255  # a bright corner shows where the top-left went
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    loaded = read_image(tmp_path / "r.jpg")
    expected = ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg"))
    assert loaded.size == (expected.height, expected.width)
    assert np.array_equal(np.round(loaded.rgb.permute(1, 2, 0).numpy() * 255), np.asarray(expected))
    write_image(tmp_path / "out.jpg", loaded.rgb, like=loaded)
    assert Image.open(tmp_path / "out.jpg").getexif().get(0x0112) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_of_16bit_files_matches_pillow(tmp_path, orientation):
    values = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "o.png").write_bytes(encode_png16(values, exif=exif.tobytes()))
    loaded = read_image(tmp_path / "o.png")
    high_bytes = Image.fromarray((values[..., 0] >> 8).astype(np.uint8))
    reference = np.asarray(_with_orientation(high_bytes, orientation))
    got = np.round(loaded.rgb[0].numpy() * 65535).astype(np.uint16) >> 8
    assert np.array_equal(got, reference)


def _with_orientation(image, orientation):
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    return ImageOps.exif_transpose(image)


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    pixels = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(pixels, "CMYK").save(tmp_path / "c.jpg", quality=100)
    loaded = read_image(tmp_path / "c.jpg")
    assert loaded.mode == "CMYK" and loaded.rgb.shape == (3, 8, 8)
    expected = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")) / 255.0
    assert np.allclose(loaded.rgb.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 3))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    loaded = read_image(tmp_path / "p.png")
    assert loaded.alpha is not None
    assert loaded.alpha[0, 1, 1] == 1 and loaded.alpha[0, 0, 0] == 0
    assert torch.equal(loaded.rgb[:, 1, 1], torch.tensor([0.0, 1.0, 0.0]))
    opaque = Image.new("P", (4, 3))
    opaque.putpalette([10, 20, 30] * 256)
    opaque.save(tmp_path / "q.png")
    assert read_image(tmp_path / "q.png").alpha is None


def test_icc_profile_carried_to_output(tmp_path):
    profile = _srgb_profile()
    Image.fromarray(RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(
        tmp_path / "i.jpg", icc_profile=profile
    )
    loaded = read_image(tmp_path / "i.jpg")
    assert loaded.icc_profile == profile
    for name in ("o.png", "o.jpg", "o.webp", "o.tif"):
        write_image(tmp_path / name, loaded.rgb, like=loaded)
        assert Image.open(tmp_path / name).info.get("icc_profile") == profile, name


def test_corrupt_and_missing_files_raise_read_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    good = tmp_path / "t.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(tmp_path / "trunc.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match="32-bit float"):
        read_image(tmp_path / "float.tif")


def test_folder_listing_and_tree_mirroring(tmp_path):
    root = tmp_path / "in"
    for relative in ("b.PNG", "a.jpg", "sub/c.tiff", "sub/deep/d.webp", "notes.txt", "._a.png", "out/x.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"")
    found = list_images(root, exclude=root / "out")
    assert [p.relative_to(root).as_posix() for p in found] == [
        "a.jpg",
        "b.PNG",
        "sub/c.tiff",
        "sub/deep/d.webp",
    ]
    out = tmp_path / "result"
    pairs = plan_outputs(found, root, out, suffix="_x4")
    assert [t.relative_to(out).as_posix() for _, t in pairs] == [
        "a_x4.jpg",
        "b_x4.PNG",
        "sub/c_x4.tiff",
        "sub/deep/d_x4.webp",
    ]
    assert output_path(root / "sub/c.tiff", root, out, format="png") == out / "sub/c.png"
    assert output_path(root / "anim.gif", root, out) == out / "anim.png"  # GIF is read, not written
    assert list_images(root / "a.jpg") == [root / "a.jpg"]
    assert output_path(root / "a.jpg", root / "a.jpg", out, suffix="_x4") == out / "a_x4.jpg"
    with pytest.raises(ValueError, match="both be written"):
        plan_outputs([root / "a.jpg", root / "a.png"], root, out, format="png")
    with pytest.raises(ValueError, match="overwrite"):
        plan_outputs([root / "a.jpg"], root, root)


def test_upscale_alpha():
    constant = torch.full((1, 4, 5), 0.75)
    assert torch.equal(upscale_alpha(constant, (16, 20)), torch.full((1, 16, 20), 0.75))
    edge = torch.zeros(1, 4, 4)
    edge[..., 2:] = 1
    up = upscale_alpha(edge, (16, 16))
    assert up.shape == (1, 16, 16) and up.min() >= 0 and up.max() <= 1
    assert up[0, :, 0].max() == 0 and up[0, :, -1].min() == 1
