"""Blur kernels against their closed forms, in float64 to 1e-6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from addsr_pl.data import kernels as K

TOL = 1e-6


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def closed_form(size: int, sigma_x: float, sigma_y: float, theta: float, profile) -> np.ndarray:
    """Independent reference: explicit covariance, explicit inverse, loops over the grid."""
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inverse = np.linalg.inv(rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T)
    out = np.zeros((size, size))
    half = size // 2
    for row in range(size):
        for col in range(size):
            g = np.array([col - half, row - half], dtype=np.float64)
            out[row, col] = profile(g @ inverse @ g)
    return out / out.sum()


def assert_kernel(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float64
    np.testing.assert_allclose(actual.numpy(), expected, atol=TOL, rtol=0)


def test_isotropic_gaussian_matches_exp_of_squared_radius():
    kernel = K.bivariate_gaussian(7, t64(1.3), t64(1.3), t64(0.0))[0]
    x = np.arange(7) - 3
    expected = np.exp(-(x[None, :] ** 2 + x[:, None] ** 2) / (2 * 1.3**2))
    assert_kernel(kernel, expected / expected.sum())


@pytest.mark.parametrize("theta", [0.0, 0.7, -2.4])
def test_anisotropic_gaussian_matches_rotated_covariance(theta):
    kernel = K.bivariate_gaussian(11, t64(2.5), t64(0.6), t64(theta))[0]
    assert_kernel(kernel, closed_form(11, 2.5, 0.6, theta, lambda q: math.exp(-0.5 * q)))


@pytest.mark.parametrize(("sx", "sy", "theta", "beta"), [(1.5, 1.5, 0.0, 0.6), (2.8, 0.9, 1.1, 3.5)])
def test_generalized_gaussian(sx, sy, theta, beta):
    kernel = K.bivariate_generalized_gaussian(13, t64(sx), t64(sy), t64(theta), t64(beta))[0]
    assert_kernel(kernel, closed_form(13, sx, sy, theta, lambda q: math.exp(-0.5 * q**beta)))


@pytest.mark.parametrize(("sx", "sy", "theta", "beta"), [(1.0, 1.0, 0.0, 1.0), (2.2, 0.4, -0.5, 1.8)])
def test_plateau(sx, sy, theta, beta):
    kernel = K.bivariate_plateau(9, t64(sx), t64(sy), t64(theta), t64(beta))[0]
    assert_kernel(kernel, closed_form(9, sx, sy, theta, lambda q: 1.0 / (q**beta + 1.0)))


@pytest.mark.parametrize(("size", "cutoff"), [(7, math.pi / 3), (21, 2.0), (15, math.pi)])
def test_sinc_matches_bessel_formula_with_its_limit_at_the_centre(size, cutoff):
    kernel = K.circular_lowpass_kernel(size, t64(cutoff))[0]
    c = (size - 1) / 2
    r = np.hypot(*np.meshgrid(np.arange(size) - c, np.arange(size) - c))
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    expected[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    assert_kernel(kernel, expected / expected.sum())


def test_batched_parameters_give_one_kernel_each():
    sx, sy, th = t64(0.5, 2.0, 3.0), t64(0.5, 1.0, 0.3), t64(0.0, 0.4, -1.0)
    batch = K.bivariate_gaussian(21, sx, sy, th)
    for b in range(3):
        single = K.bivariate_gaussian(21, sx[b : b + 1], sy[b : b + 1], th[b : b + 1])[0]
        torch.testing.assert_close(batch[b], single, atol=1e-12, rtol=0)
    torch.testing.assert_close(batch.sum((1, 2)), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("size", [7, 13, 21])
def test_limited_support_equals_the_small_kernel_zero_padded(size):
    big = K.bivariate_generalized_gaussian(21, t64(2.0), t64(1.2), t64(0.3), t64(0.8))
    limited = K.limit_support(big, torch.tensor([size]))[0]
    small = K.bivariate_generalized_gaussian(size, t64(2.0), t64(1.2), t64(0.3), t64(0.8))[0]
    pad = (21 - size) // 2
    assert_kernel(limited, np.pad(small.numpy(), pad))


def test_mixed_kernels_pick_the_family_and_isotropy_of_each_type():
    n = len(K.KERNEL_TYPES)
    kernel_type = torch.arange(n)
    sizes = torch.full((n,), 15)
    sx, sy = torch.full((n,), 2.0, dtype=torch.float64), torch.full((n,), 0.8, dtype=torch.float64)
    rot, beta = torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 1.7, dtype=torch.float64)
    no_sinc = torch.zeros(n, dtype=torch.bool)
    mixed = K.mixed_kernels(
        21, kernel_type, sizes, sx, sy, rot, beta, no_sinc, torch.ones(n, dtype=torch.float64)
    )
    zero, one = t64(0.0), t64(1.0)
    a, b, r, s = t64(2.0), t64(0.8), t64(0.5), t64(1.7)
    expected = [
        K.bivariate_gaussian(15, a, a, zero),
        K.bivariate_gaussian(15, a, b, r),
        K.bivariate_generalized_gaussian(15, a, a, zero, s),
        K.bivariate_generalized_gaussian(15, a, b, r, s),
        K.bivariate_plateau(15, a, a, zero, s),
        K.bivariate_plateau(15, a, b, r, s),
    ]
    for i, kernel in enumerate(expected):
        assert_kernel(mixed[i], np.pad(kernel[0].numpy(), 3))
    # the Gaussian types ignore beta: iso equals the generalized form at beta = 1
    assert_kernel(mixed[0], np.pad(K.bivariate_generalized_gaussian(15, a, a, zero, one)[0].numpy(), 3))
    sinc = K.mixed_kernels(
        21, kernel_type[:1], torch.tensor([9]), sx[:1], sy[:1], rot[:1], beta[:1], ~no_sinc[:1], t64(1.5)
    )
    assert_kernel(sinc[0], np.pad(K.circular_lowpass_kernel(9, t64(1.5))[0].numpy(), 6))


def test_gaussian_taps_match_opencv_for_the_usm_kernel():
    cv2 = pytest.importorskip("cv2")
    taps = K.gaussian_kernel1d(51, 8.0, dtype=torch.float64)
    np.testing.assert_allclose(taps.numpy(), cv2.getGaussianKernel(51, 0)[:, 0], atol=TOL, rtol=0)


def test_even_kernel_sizes_are_rejected():
    with pytest.raises(ValueError, match="odd"):
        K.bivariate_gaussian(8, t64(1.0), t64(1.0), t64(0.0))
