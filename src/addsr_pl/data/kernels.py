"""Blur kernels of the Real-ESRGAN degradation, generated in torch with per-sample parameters.

All generators take per-sample parameters as ``[B]`` tensors and return ``[B, K, K]`` kernels
normalised to sum 1, on the parameters' device and dtype. The coordinate grid is centred: entry
``[i, j]`` sits at ``x = j - K // 2`` (column) and ``y = i - K // 2`` (row), as in BasicSR.

Kernels of different sizes share one batch by living on a common ``K x K`` grid: a kernel of odd
size ``k <= K`` is the ``K``-grid kernel with everything outside the central ``k x k`` window set to
zero and the rest renormalised, which equals the ``k``-grid kernel zero-padded to ``K``
(`limit_support`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def mesh_grid(kernel_size: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Centred coordinates ``(x, y)``, each ``[K, K]``; x varies along columns, y along rows."""
    if kernel_size % 2 != 1:
        raise ValueError(f"Kernel sizes must be odd, got {kernel_size}.")
    axis = torch.arange(kernel_size, device=device, dtype=dtype) - kernel_size // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def sigma_matrix(sigma_x: Tensor, sigma_y: Tensor, rotation: Tensor) -> Tensor:
    """Covariance ``U diag(sigma_x², sigma_y²) Uᵀ`` with U the rotation by `rotation`; ``[B, 2, 2]``."""
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    u = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    d = torch.diag_embed(torch.stack([sigma_x**2, sigma_y**2], -1))
    return u @ d @ u.transpose(-1, -2)


def mahalanobis(kernel_size: int, sigma_x: Tensor, sigma_y: Tensor, rotation: Tensor) -> Tensor:
    """``gᵀ Σ⁻¹ g`` on the grid, ``[B, K, K]``, computed in the rotated frame (no matrix inverse).

    With ``Σ = U D Uᵀ``, ``gᵀ Σ⁻¹ g = |D^-1/2 Uᵀ g|²``: rotate the grid by ``-rotation`` and scale.
    """
    x, y = mesh_grid(kernel_size, sigma_x.device, sigma_x.dtype)
    cos, sin = torch.cos(rotation)[:, None, None], torch.sin(rotation)[:, None, None]
    u = (cos * x + sin * y) / sigma_x[:, None, None]
    v = (-sin * x + cos * y) / sigma_y[:, None, None]
    return u * u + v * v


def _normalise(kernel: Tensor) -> Tensor:
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def bivariate_gaussian(kernel_size: int, sigma_x: Tensor, sigma_y: Tensor, rotation: Tensor) -> Tensor:
    """``exp(-½ gᵀΣ⁻¹g)``, normalised. Isotropic: pass ``sigma_y = sigma_x`` and ``rotation = 0``."""
    return _normalise(torch.exp(-0.5 * mahalanobis(kernel_size, sigma_x, sigma_y, rotation)))


def bivariate_generalized_gaussian(
    kernel_size: int, sigma_x: Tensor, sigma_y: Tensor, rotation: Tensor, beta: Tensor
) -> Tensor:
    """``exp(-½ (gᵀΣ⁻¹g)^β)``, normalised; β = 1 is the Gaussian."""
    q = mahalanobis(kernel_size, sigma_x, sigma_y, rotation)
    return _normalise(torch.exp(-0.5 * q ** beta[:, None, None]))


def bivariate_plateau(
    kernel_size: int, sigma_x: Tensor, sigma_y: Tensor, rotation: Tensor, beta: Tensor
) -> Tensor:
    """``1 / ((gᵀΣ⁻¹g)^β + 1)``, normalised."""
    q = mahalanobis(kernel_size, sigma_x, sigma_y, rotation)
    return _normalise(1.0 / (q ** beta[:, None, None] + 1.0))


def circular_lowpass_kernel(kernel_size: int, cutoff: Tensor) -> Tensor:
    """The sinc (ideal circular low-pass) kernel ``ω J₁(ω r) / (2π r)``, normalised.

    At ``r = 0`` it takes its limit ``ω² / (4π)``.
    """
    x, y = mesh_grid(kernel_size, cutoff.device, cutoff.dtype)
    radius = torch.sqrt(x * x + y * y)
    omega = cutoff[:, None, None]
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    kernel = omega * torch.special.bessel_j1(omega * safe_radius) / (2 * math.pi * safe_radius)
    kernel = torch.where(radius > 0, kernel, omega**2 / (4 * math.pi))
    return _normalise(kernel)


def limit_support(kernel: Tensor, sizes: Tensor) -> Tensor:
    """Zero each kernel outside its central ``sizes[b]²`` window and renormalise."""
    x, y = mesh_grid(kernel.shape[-1], kernel.device, kernel.dtype)
    half = (sizes.to(kernel.dtype) // 2)[:, None, None]
    inside = (x.abs() <= half) & (y.abs() <= half)
    return _normalise(torch.where(inside, kernel, torch.zeros_like(kernel)))


def mixed_kernels(
    kernel_size: int,
    kernel_type: Tensor,
    sizes: Tensor,
    sigma_x: Tensor,
    sigma_y: Tensor,
    rotation: Tensor,
    beta: Tensor,
    sinc: Tensor,
    cutoff: Tensor,
) -> Tensor:
    """One kernel per sample on a common `kernel_size` grid.

    Args:
        kernel_type: ``[B]`` indices into `KERNEL_TYPES`.
        sizes: ``[B]`` odd support sizes ``<= kernel_size``.
        sigma_x, sigma_y, rotation, beta: ``[B]`` shape parameters (isotropic types ignore
            ``sigma_y`` and ``rotation``; Gaussian types ignore ``beta``).
        sinc: ``[B]`` bool; where true the kernel is `circular_lowpass_kernel` with `cutoff`.
    """
    isotropic = kernel_type % 2 == 0  # iso, generalized_iso, plateau_iso sit at even indices
    sigma_y = torch.where(isotropic, sigma_x, sigma_y)
    rotation = torch.where(isotropic, torch.zeros_like(rotation), rotation)
    family = kernel_type // 2  # 0 Gaussian, 1 generalized Gaussian, 2 plateau
    beta = torch.where(family == 0, torch.ones_like(beta), beta)
    q = mahalanobis(kernel_size, sigma_x, sigma_y, rotation) ** beta[:, None, None]
    plateau = (family == 2)[:, None, None]
    kernel = torch.where(plateau, 1.0 / (q + 1.0), torch.exp(-0.5 * q))
    kernel = torch.where(sinc[:, None, None], circular_lowpass_kernel(kernel_size, cutoff), kernel)
    return limit_support(kernel, sizes)


def pulse_kernel(batch: int, kernel_size: int, device=None, dtype=torch.float32) -> Tensor:
    """Kernels that leave an image unchanged (a 1 at the centre)."""
    kernel = torch.zeros(batch, kernel_size, kernel_size, device=device, dtype=dtype)
    kernel[:, kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def gaussian_kernel1d(kernel_size: int, sigma: float, device=None, dtype=torch.float32) -> Tensor:
    """Normalised 1-D Gaussian taps (OpenCV's getGaussianKernel for sigma > 0)."""
    axis = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
    taps = torch.exp(-(axis**2) / (2 * sigma**2))
    return taps / taps.sum()
