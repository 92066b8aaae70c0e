"""JPEG round trips for the degradation, batched, with one quality per sample, on the batch's device.

Two codecs:

- ``basicsr``: the codec of the Real-ESRGAN training pipeline (BasicSR's ``DiffJPEG`` with exact
  rounding), which AddSR's and SeeSR's training pairs went through. Its definition:

  * the image is zero-padded at the bottom/right to a multiple of 16 (black, not replicated);
  * RGB -> YCbCr with the JFIF full-range matrix, on 0..255 values that are *not* rounded;
  * Cb and Cr are averaged over 2x2 blocks (4:2:0), and repeated 2x2 on decoding (no filter);
  * 8x8 orthonormal DCT-II of each plane minus 128;
  * quantisation by the ITU-T T.81 Annex K tables times a quality factor
    ``50 / q`` below q = 50 and ``2 - q / 50`` from q = 50, a continuous factor with no integer
    rounding and no clamp of the scaled table (unlike libjpeg); the luma table is applied transposed
    (horizontal and vertical frequencies swapped relative to the standard);
  * coefficients rounded half to even; the decoded RGB is clamped to 0..255 but not rounded.

- ``kornia``: ``kornia.enhance.jpeg_codec_differentiable`` (rounding by a smooth polynomial,
  libjpeg-style integer tables). At the same quality it is milder than ``basicsr``; see
  docs/degradation.md for the measured mapping.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

JPEG_CODECS = ("basicsr", "kornia")

# ITU-T T.81 Annex K, Tables K.1 (luminance) and K.2 (chrominance), rows = vertical frequency.
LUMA_QUANTISATION = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_QUANTISATION = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)
# JFIF full-range YCbCr (T.871), on 0..255 values; chroma centred on 128
RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136, -0.714136),
    (1.0, 1.772, 0.0),
)
BLOCK = 8
# chroma is subsampled 2x2, so whole 8x8 chroma blocks need a multiple of 16
MACROBLOCK = 16
LEVEL_SHIFT = 128.0


def quality_factor(quality: Tensor) -> Tensor:
    """The scale of the quantisation tables at JPEG quality `quality` (1..100), as a real number."""
    return torch.where(quality < 50, 50.0 / quality, 2.0 - quality / 50.0)


def dct_matrix(device=None, dtype=torch.float32) -> Tensor:
    """The 8x8 orthonormal DCT-II matrix D, so that ``D @ block @ D.T`` is the 2-D DCT."""
    k = torch.arange(BLOCK, device=device, dtype=torch.float64)
    basis = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / (2 * BLOCK))
    norm = torch.full((BLOCK, 1), math.sqrt(2 / BLOCK), dtype=torch.float64, device=device)
    norm[0] = math.sqrt(1 / BLOCK)
    return (basis * norm).to(dtype)


def _quantise_planes(planes: Tensor, tables: Tensor) -> Tensor:
    """DCT, quantise with per-sample ``tables [B, 8, 8]``, dequantise and invert ``planes [B, C, h, w]``."""
    batch, channels, height, width = planes.shape
    dct = dct_matrix(planes.device, planes.dtype)
    blocks = planes.reshape(batch, channels, height // BLOCK, BLOCK, width // BLOCK, BLOCK)
    blocks = blocks.permute(0, 1, 2, 4, 3, 5) - LEVEL_SHIFT
    coefficients = dct @ blocks @ dct.T
    step = tables[:, None, None, None]
    coefficients = torch.round(coefficients / step) * step
    blocks = dct.T @ coefficients @ dct + LEVEL_SHIFT
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height, width)


def basicsr_jpeg(image: Tensor, quality: Tensor) -> Tensor:
    """JPEG round trip of ``image [B, 3, H, W]`` in [0, 1] at per-sample ``quality [B]`` (the
    ``basicsr`` codec of the module docstring). Returns a float image in [0, 1], not 8-bit rounded."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"JPEG needs RGB batches [B, 3, H, W], got shape {tuple(image.shape)}.")
    batch, _, height, width = image.shape
    dtype, device = image.dtype, image.device
    quality = quality.to(device=device, dtype=dtype).reshape(batch)
    pad_h, pad_w = -height % MACROBLOCK, -width % MACROBLOCK
    x = F.pad(image, (0, pad_w, 0, pad_h), mode="constant", value=0.0) * 255.0
    to_ycbcr = torch.tensor(RGB_TO_YCBCR, device=device, dtype=dtype)
    ycbcr = torch.einsum("ij,bjhw->bihw", to_ycbcr, x)
    luma = ycbcr[:, :1]
    chroma = F.avg_pool2d(ycbcr[:, 1:] + LEVEL_SHIFT, kernel_size=2, stride=2)

    factor = quality_factor(quality)[:, None, None]
    luma_table = torch.tensor(LUMA_QUANTISATION, device=device, dtype=dtype).T
    chroma_table = torch.tensor(CHROMA_QUANTISATION, device=device, dtype=dtype)
    luma = _quantise_planes(luma, luma_table * factor)
    chroma = _quantise_planes(chroma, chroma_table * factor) - LEVEL_SHIFT
    chroma = chroma.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    to_rgb = torch.tensor(YCBCR_TO_RGB, device=device, dtype=dtype)
    rgb = torch.einsum("ij,bjhw->bihw", to_rgb, torch.cat([luma, chroma], dim=1))
    return (rgb.clamp(0.0, 255.0) / 255.0)[..., :height, :width]


def kornia_jpeg(image: Tensor, quality: Tensor) -> Tensor:
    """kornia's differentiable JPEG round trip at per-sample ``quality [B]``."""
    quality = quality.to(image.dtype)
    if image.device.type != "cpu":
        return kornia.enhance.jpeg_codec_differentiable(image, quality)
    # On CPU, oneDNN is slow for the codec's single-channel 3-tap chroma filters; the native
    # kernels give the same result about 1.5x faster.
    previous = torch.backends.mkldnn.set_flags(False, None, None, None)
    try:
        return kornia.enhance.jpeg_codec_differentiable(image, quality)
    finally:
        torch.backends.mkldnn.set_flags(previous[0], None, None, None)


def jpeg_round_trip(image: Tensor, quality: Tensor, codec: str = "basicsr") -> Tensor:
    """Clamp to [0, 1] and JPEG round trip with `codec` (one of `JPEG_CODECS`)."""
    if codec not in JPEG_CODECS:
        raise ValueError(f"jpeg_codec must be one of {JPEG_CODECS}, got {codec!r}.")
    if image.shape[0] == 0:
        return image
    image = torch.clamp(image, 0, 1)
    return basicsr_jpeg(image, quality) if codec == "basicsr" else kornia_jpeg(image, quality)
