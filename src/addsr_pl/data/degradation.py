"""Degradations that turn HR batches into (training target, LR) pairs on the batch's device.

Every degradation is an ``nn.Module`` with ``forward(hr, generator) -> (hr_target, lr)``: `hr` is
``[B, 3, H, W]`` in [0, 1]; all randomness comes from `generator`, which lives on ``hr.device``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantize_8bit(image: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to the 256 levels an 8-bit LR file would hold."""
    return torch.clamp((image * 255.0).round(), 0, 255) / 255.0


def crop_to_multiple(hr: Tensor, scale: int) -> Tensor:
    """Drop the bottom/right rows and columns that do not fill a whole LR pixel."""
    height, width = hr.shape[-2:]
    if height < scale or width < scale:
        raise ValueError(f"HR of size {height}x{width} is smaller than one LR pixel at scale {scale}.")
    return hr[..., : height - height % scale, : width - width % scale]


def bicubic_downscale(image: Tensor, scale: int) -> Tensor:
    """Bicubic ×1/scale with antialiasing (the kernel PIL and MATLAB's imresize use for downscaling)."""
    height, width = image.shape[-2:]
    return F.interpolate(
        image, size=(height // scale, width // scale), mode="bicubic", antialias=True, align_corners=False
    )


class BicubicDegradation(nn.Module):
    """LR = bicubic ×1/scale with antialiasing, quantized to 8 bits; the target is the HR itself.

    HR sizes that are not a multiple of `scale` are cropped at the bottom/right so that the pair
    stays aligned (``hr_target`` is exactly ``scale`` times the LR).
    """

    def __init__(self, scale: int = 4):
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}.")
        self.scale = int(scale)

    def forward(self, hr: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        hr = crop_to_multiple(hr, self.scale)
        return hr, quantize_8bit(bicubic_downscale(hr, self.scale))
