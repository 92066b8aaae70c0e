"""The BasicSR-compatible JPEG codec against a reference written from the codec's definition.

The reference below works on one image at a time in NumPy float64, block by block, with SciPy's
orthonormal DCT; it shares no code with `addsr_pl.data.jpeg`.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from addsr_pl.data.jpeg import basicsr_jpeg, jpeg_round_trip, kornia_jpeg, quality_factor

# ITU-T T.81 Annex K, K.1 and K.2, rows = vertical frequency
K1 = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)
K2 = np.full((8, 8), 99.0)
K2[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def reference_jpeg(image: np.ndarray, quality: float) -> np.ndarray:
    """BasicSR's DiffJPEG(differentiable=False) on one ``[H, W, 3]`` image in [0, 1], from its definition."""
    height, width, _ = image.shape
    padded = np.zeros((height + (-height % 16), width + (-width % 16), 3))
    padded[:height, :width] = image * 255
    r, g, b = padded[..., 0], padded[..., 1], padded[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    factor = 50 / quality if quality < 50 else 2 - quality / 50

    def subsample(plane):
        return plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).mean(axis=(1, 3))

    def code(plane, table):
        out = np.empty_like(plane)
        for top in range(0, plane.shape[0], 8):
            for left in range(0, plane.shape[1], 8):
                block = plane[top : top + 8, left : left + 8] - 128
                coefficients = dctn(block, norm="ortho")
                coefficients = np.round(coefficients / table) * table
                out[top : top + 8, left : left + 8] = idctn(coefficients, norm="ortho") + 128
        return out

    # BasicSR divides the (vertical u, horizontal v) coefficient by K.1[v, u]: the transposed table
    y = code(y, K1.T * factor)
    cb = np.repeat(np.repeat(code(subsample(cb), K2 * factor), 2, axis=0), 2, axis=1) - 128
    cr = np.repeat(np.repeat(code(subsample(cr), K2 * factor), 2, axis=0), 2, axis=1) - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(rgb, 0, 255)[:height, :width] / 255


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    import skimage.data

    crops = [skimage.data.astronaut()[100:141, 150:187], skimage.data.coffee()[50:91, 200:237]]
    return torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c in crops]).double() / 255


@pytest.mark.parametrize("qualities", [(30.0, 95.0), (50.0, 63.7), (12.5, 49.9)])
def test_basicsr_codec_matches_the_definition(photos, qualities):
    out = basicsr_jpeg(photos, torch.tensor(qualities, dtype=torch.float64))
    assert out.shape == photos.shape  # 41 x 37: padding to 16 is cropped away again
    for image, decoded, quality in zip(photos, out, qualities):
        expected = reference_jpeg(image.permute(1, 2, 0).numpy(), quality)
        np.testing.assert_allclose(decoded.permute(1, 2, 0).numpy(), expected, atol=1e-9)


def test_basicsr_codec_in_float32_rounds_to_the_same_8_bit_image(photos):
    quality = torch.tensor([40.0, 80.0])
    out32 = basicsr_jpeg(photos.float(), quality)
    out64 = basicsr_jpeg(photos, quality.double())
    levels = ((out32.double() * 255).round() - (out64 * 255).round()).abs()
    assert levels.max() <= 1 and (levels > 0).double().mean() < 1e-3


def test_quality_factor_is_the_continuous_table_scale():
    quality = torch.tensor([10.0, 25.0, 49.0, 50.0, 75.0, 95.0, 100.0])
    expected = torch.tensor([5.0, 2.0, 50 / 49, 1.0, 0.5, 0.1, 0.0])
    torch.testing.assert_close(quality_factor(quality), expected)


def test_codecs_keep_flat_images_and_the_basicsr_one_is_harsher(photos):
    # mid-grey (128, the level shift) in whole macroblocks: every coefficient is 0, nothing changes
    flat = torch.full((1, 3, 32, 32), 128 / 255)
    torch.testing.assert_close(basicsr_jpeg(flat, torch.tensor([30.0])), flat, atol=1e-5, rtol=0)
    image = photos.float()
    quality = torch.full((2,), 30.0)
    error_basicsr = (jpeg_round_trip(image, quality, "basicsr") - image).pow(2).mean()
    error_kornia = (kornia_jpeg(image, quality) - image).pow(2).mean()
    assert error_basicsr > error_kornia
    with pytest.raises(ValueError, match="jpeg_codec"):
        jpeg_round_trip(image, quality, "libjpeg")


def test_basicsr_itself_when_installed(photos):
    """Only where BasicSR is importable (it is not a dependency): its DiffJPEG, float32."""
    import torchvision.transforms.functional as functional

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional)
    diffjpeg = pytest.importorskip("basicsr.utils.diffjpeg")
    quality = torch.tensor([30.0, 77.0])
    expected = diffjpeg.DiffJPEG(differentiable=False)(photos.float(), quality.clone())
    torch.testing.assert_close(basicsr_jpeg(photos.float(), quality), expected, atol=1e-5, rtol=0)
