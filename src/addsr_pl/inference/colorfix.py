"""Colour correction of the super-resolved image against the upscaled LR (the official default is AdaIN).

Diffusion SR shifts colours; both fixes keep the generated detail and take the colours from the
reference, the LR upscaled to the output size. Inputs are batched [B, 3, H, W]; the result is not
clamped (the caller clamps once, at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLOR_FIXES = ("adain", "wavelet", "none")


def adain_color_fix(image: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Per image and channel, shift and scale `image` to the mean and std of `reference`.

    The reference may have another size (the statistics don't depend on it). `eps` keeps a flat
    channel from dividing by zero.
    """
    _check_batch(image, reference, same_size=False)
    x, ref = image.float(), reference.float()
    mean, std = _mean_std(x, eps)
    ref_mean, ref_std = _mean_std(ref, eps)
    return ((x - mean) / std * ref_std + ref_mean).to(image.dtype)


def _mean_std(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def wavelet_decomposition(image: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(high, low) with image = high + low: an à-trous wavelet transform with `levels` levels.

    Level i blurs with the 3x3 binomial kernel dilated by 2**i (replicate padding), so `low` keeps
    structure coarser than about 2**levels pixels and `high` everything finer.
    """
    if levels < 1:
        raise ValueError(f"wavelet levels must be >= 1, got {levels}")
    taps = torch.tensor([0.25, 0.5, 0.25], dtype=image.dtype, device=image.device)
    kernel = (taps[:, None] * taps[None, :]).expand(image.shape[1], 1, 3, 3)
    low = image
    for level in range(levels):
        dilation = 2**level
        padded = F.pad(low, (dilation,) * 4, mode="replicate")
        low = F.conv2d(padded, kernel, dilation=dilation, groups=image.shape[1])
    return image - low, low


def wavelet_color_fix(image: Tensor, reference: Tensor, levels: int) -> Tensor:
    """The high frequencies of `image` on the low frequencies of `reference` (same size)."""
    _check_batch(image, reference, same_size=True)
    high, _ = wavelet_decomposition(image.float(), levels)
    _, low = wavelet_decomposition(reference.float(), levels)
    return (high + low).to(image.dtype)


def color_fix(name: str, image: Tensor, reference: Tensor, *, wavelet_levels: int) -> Tensor:
    """Apply the colour fix `name` ("adain", "wavelet" or "none") of `image` against `reference`."""
    if name == "adain":
        return adain_color_fix(image, reference)
    if name == "wavelet":
        return wavelet_color_fix(image, reference, wavelet_levels)
    if name == "none":
        return image
    raise ValueError(f"Unknown colour fix {name!r}; choose one of {', '.join(COLOR_FIXES)}")


def _check_batch(image: Tensor, reference: Tensor, same_size: bool) -> None:
    if image.ndim != 4 or reference.ndim != 4 or image.shape[:2] != reference.shape[:2]:
        raise ValueError(
            f"colour fix needs image and reference shaped [B, C, H, W] with the same B and C, "
            f"got {tuple(image.shape)} and {tuple(reference.shape)}"
        )
    if same_size and image.shape[-2:] != reference.shape[-2:]:
        raise ValueError(
            f"wavelet colour fix needs the reference at the output size: image {tuple(image.shape[-2:])}, "
            f"reference {tuple(reference.shape[-2:])}; upscale the LR to the output size first"
        )
