"""Colour fixes: AdaIN matches the reference statistics; wavelet swaps the low frequencies."""

import math

import pytest
import torch

from addsr_pl.inference.colorfix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition


def test_adain_matches_reference_mean_and_std():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 20, generator=generator) * 0.5
    reference = torch.rand(2, 3, 8, 10, generator=generator) * 0.3 + 0.6
    fixed = adain_color_fix(image, reference)
    assert torch.allclose(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-5)
    assert torch.allclose(fixed.flatten(2).std(-1), reference.flatten(2).std(-1), rtol=1e-3)
    # the structure is the image's: a per-channel affine map with positive slope preserves the ordering
    assert torch.equal(fixed.flatten(2).argsort(-1), image.flatten(2).argsort(-1))


def _images(size=96):
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    checker = ((x + y) % 2) * 2 - 1  # the finest possible detail, removed by the first blur exactly
    smooth_a = 0.4 + 0.1 * torch.sin(2 * math.pi * x / size)
    smooth_b = 0.6 + 0.1 * torch.cos(2 * math.pi * y / size)
    detail = 0.05 * checker
    image = (smooth_a + detail).expand(1, 3, -1, -1).clone()
    reference = smooth_b.expand(1, 3, -1, -1).clone()
    return image, reference, detail, smooth_b


def test_wavelet_keeps_image_detail_and_reference_colours():
    image, reference, detail, smooth_b = _images()
    fixed = wavelet_color_fix(image, reference, levels=2)
    margin = 8  # replicate padding bends the smooth parts near the border; the test looks inside
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    expected = (smooth_b + detail).expand_as(fixed)
    assert (fixed - expected)[inner].abs().max() < 2e-3
    high, low = wavelet_decomposition(image, levels=2)
    assert torch.allclose(high + low, image)


def test_wavelet_closed_forms():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 24, 24, generator=generator)
    assert torch.allclose(wavelet_color_fix(image, image, levels=5), image, atol=1e-6)
    shift = torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    # the blur kernel sums to one, so a constant offset of the reference moves the result by exactly it
    assert torch.allclose(wavelet_color_fix(image, image + shift, levels=5), image + shift, atol=1e-5)


def test_dispatcher_and_errors():
    image = torch.rand(1, 3, 8, 8)
    assert color_fix("none", image, image * 0, wavelet_levels=3) is image
    assert torch.equal(color_fix("adain", image, image, wavelet_levels=3), adain_color_fix(image, image))
    with pytest.raises(ValueError, match="Unknown colour fix 'histogram'"):
        color_fix("histogram", image, image, wavelet_levels=3)
    with pytest.raises(ValueError, match="output size"):
        wavelet_color_fix(image, torch.rand(1, 3, 4, 4), levels=2)
