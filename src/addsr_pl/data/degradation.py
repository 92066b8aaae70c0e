"""Degradations that turn HR batches into (training target, LR) pairs on the batch's device.

Every degradation is an ``nn.Module`` with ``forward(hr, generator) -> (hr_target, lr)``: `hr` is
``[B, 3, H, W]`` in [0, 1]; all randomness comes from `generator`, which lives on ``hr.device``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addsr_pl.data.jpeg import JPEG_CODECS, jpeg_round_trip
from addsr_pl.data.kernels import (
    KERNEL_TYPES,
    circular_lowpass_kernel,
    gaussian_kernel1d,
    limit_support,
    mixed_kernels,
    pulse_kernel,
)


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


# --------------------------------------------------------------------------------------------- #
# Real-ESRGAN second-order degradation                                                          #
# --------------------------------------------------------------------------------------------- #

RESIZE_DIRECTIONS = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")
# stage-1 resize grid: `size` maps pixel edges onto pixel edges of the int(H*s) x int(W*s) output;
# `scale_factor` samples at (i + 0.5) / s - 0.5, as F.interpolate(scale_factor=s) in BasicSR
RESIZE_GRIDS = ("size", "scale_factor")


def _check_probs(name: str, probs: Sequence[float], count: int) -> None:
    if len(probs) != count or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(
            f"{name} must be {count} non-negative probabilities summing to 1, got {list(probs)}."
        )


def _check_range(name: str, bounds: Sequence[float], low: float = -math.inf, high: float = math.inf) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {list(bounds)}.")


@dataclass
class USMSettings:
    """Unsharp masking of the HR target: ``sharp = img + weight (img - blur)`` where the residual
    exceeds `threshold`/255, blended through a blurred mask (BasicSR's USMSharp)."""

    enabled: bool = True
    kernel_size: int = 51
    sigma: float = 8.0
    weight: float = 0.5
    threshold: float = 10.0

    def __post_init__(self):
        if self.kernel_size % 2 != 1 or self.sigma <= 0:
            raise ValueError(f"usm.kernel_size must be odd and usm.sigma positive, got {self}.")


@dataclass
class BlurSettings:
    """One blur stage: kernel type mixture, shape ranges and the chance of a sinc kernel instead."""

    kernel_types: Sequence[str] = KERNEL_TYPES
    kernel_probs: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    sigma: Sequence[float] = (0.2, 3.0)
    betag: Sequence[float] = (0.5, 4.0)
    betap: Sequence[float] = (1.0, 2.0)

    def __post_init__(self):
        if tuple(self.kernel_types) != KERNEL_TYPES:
            raise ValueError(
                f"kernel_types must list {list(KERNEL_TYPES)} in this order, got {self.kernel_types}."
            )
        _check_probs("kernel_probs", self.kernel_probs, len(KERNEL_TYPES))
        _check_range("sinc_prob", (self.sinc_prob, self.sinc_prob), 0, 1)
        _check_range("sigma", self.sigma, 1e-6)
        _check_range("betag", self.betag, 1e-6)
        _check_range("betap", self.betap, 1e-6)


@dataclass
class StageSettings:
    """Blur, resize, noise and JPEG of one degradation order.

    The first order's JPEG uses ``stage1.jpeg_range``; the second order has no JPEG of its own, and
    ``stage2.jpeg_range`` is the quality range of the final JPEG (BasicSR's ``jpeg_range2``).
    """

    blur_prob: float = 1.0
    resize_probs: Sequence[float] = (0.2, 0.7, 0.1)
    resize_range: Sequence[float] = (0.15, 1.5)
    resize_modes: Sequence[str] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    noise_range: Sequence[float] = (1.0, 30.0)
    poisson_scale_range: Sequence[float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Sequence[float] = (30.0, 95.0)
    resize_grid: str = "size"

    def __post_init__(self):
        if self.resize_grid not in RESIZE_GRIDS:
            raise ValueError(f"resize_grid must be one of {RESIZE_GRIDS}, got {self.resize_grid!r}.")
        for key in ("blur_prob", "gaussian_noise_prob", "gray_noise_prob"):
            _check_range(key, (getattr(self, key),) * 2, 0, 1)
        _check_probs("resize_probs (up, down, keep)", self.resize_probs, 3)
        _check_range("resize_range", self.resize_range, 1e-3)
        if not self.resize_range[0] <= 1 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1 (down below, up above), got {self.resize_range}.")
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(
                f"resize_modes must be a non-empty subset of {RESIZE_MODES}, got {self.resize_modes}."
            )
        _check_range("noise_range", self.noise_range, 0)
        _check_range("poisson_scale_range", self.poisson_scale_range, 0)
        _check_range("jpeg_range", self.jpeg_range, 1, 100)


@dataclass
class FinalSettings:
    """Last step: [resize back + sinc] and JPEG (quality from ``stage2.jpeg_range``), in random order."""

    sinc_prob: float = 0.8
    # sinc support, drawn uniformly per sample (BasicSR: the blur kernel sizes, 7..21)
    sinc_kernel_sizes: Sequence[int] = (7, 9, 11, 13, 15, 17, 19, 21)
    # cutoff frequency of the final sinc, in units of pi
    cutoff_range: Sequence[float] = (1 / 3, 1.0)
    resize_modes: Sequence[str] = RESIZE_MODES
    jpeg_first_prob: float = 0.5

    def __post_init__(self):
        _check_range("final.sinc_prob", (self.sinc_prob,) * 2, 0, 1)
        _check_range("final.jpeg_first_prob", (self.jpeg_first_prob,) * 2, 0, 1)
        _check_range("final.cutoff_range", self.cutoff_range, 0, 1)
        if not self.sinc_kernel_sizes or any(k % 2 != 1 or k < 1 for k in self.sinc_kernel_sizes):
            raise ValueError(
                f"final.sinc_kernel_sizes must be odd positive sizes, got {self.sinc_kernel_sizes}."
            )
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(
                f"final.resize_modes must be a subset of {RESIZE_MODES}, got {self.resize_modes}."
            )


def _settings(cls, value):
    if isinstance(value, cls):
        return value
    return cls(**({} if value is None else dict(value)))


def _uniform(bounds: Sequence[float], shape, generator, device) -> Tensor:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _choice(probs: Sequence[float], count: int, generator, device) -> Tensor:
    weights = torch.tensor([float(p) for p in probs], device=device)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def _split_beta(bounds: Sequence[float], count: int, generator, device) -> Tensor:
    """BasicSR's beta: with probability 1/2 uniform in [min, 1], else uniform in [1, max]."""
    below = torch.rand(count, generator=generator, device=device) < 0.5
    low = _uniform((bounds[0], 1.0), count, generator, device)
    high = _uniform((1.0, bounds[1]), count, generator, device)
    return torch.where(below, low, high)


def unique_levels(image: Tensor) -> Tensor:
    """Number of distinct 8-bit levels in each sample of a quantized ``[B, C, H, W]`` batch."""
    batch = image.shape[0]
    levels = (image * 255).round().long().clamp(0, 255).reshape(batch, -1)
    levels = levels + 256 * torch.arange(batch, device=image.device)[:, None]
    counts = torch.bincount(levels.flatten(), minlength=256 * batch).reshape(batch, 256)
    return (counts > 0).sum(1)


def poisson_noise(image: Tensor, generator: torch.Generator) -> Tensor:
    """BasicSR's shot noise: Poisson counts on 8-bit levels, with 2^ceil(log2(#levels)) photons."""
    image = quantize_8bit(image)
    vals = (2.0 ** torch.ceil(torch.log2(unique_levels(image).to(image.dtype))))[:, None, None, None]
    return torch.poisson(image * vals, generator=generator) / vals - image


class RealESRGANDegradation(nn.Module):
    """The second-order Real-ESRGAN degradation (USM, blur, resize, noise, JPEG, twice; final sinc),
    with every random choice drawn per sample.

    BasicSR draws the resize direction, interpolation mode and noise type once per batch; here each
    sample gets its own. Samples of similar size after a random resize share padded tensors
    ("buckets"), so the work tracks the real image sizes, not the largest one.

    Args:
        scale: SR factor; the LR is ``H/scale x W/scale``.
        kernel_sizes: odd blur kernel sizes drawn uniformly (7..21 in Real-ESRGAN).
        usm, blur1, stage1, blur2, stage2, final: `USMSettings`, `BlurSettings`,
            `StageSettings` and `FinalSettings` (or dicts of their fields).
        jpeg_codec: ``basicsr`` (the Real-ESRGAN pipeline's codec) or ``kornia``
            (`addsr_pl.data.jpeg`).
        gt_size: side of a paired random crop of the output (None: keep the whole image).
        bucket_area_ratio: after a random resize, samples whose areas differ by at most this
            factor share one padded tensor; larger means fewer, more padded batches. It changes
            speed and which random numbers land on which pixel, not the distribution of the output.
    """

    def __init__(
        self,
        scale: int = 4,
        kernel_sizes: Sequence[int] = (7, 9, 11, 13, 15, 17, 19, 21),
        usm: USMSettings | dict | None = None,
        blur1: BlurSettings | dict | None = None,
        stage1: StageSettings | dict | None = None,
        blur2: BlurSettings | dict | None = None,
        stage2: StageSettings | dict | None = None,
        final: FinalSettings | dict | None = None,
        gt_size: int | None = None,
        bucket_area_ratio: float = 1.2,
        jpeg_codec: str = "basicsr",
    ):
        super().__init__()
        self.scale = int(scale)
        self.kernel_sizes = [int(k) for k in kernel_sizes]
        if not self.kernel_sizes or any(k % 2 != 1 or k < 1 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd positive sizes, got {list(kernel_sizes)}.")
        self.max_kernel_size = max(self.kernel_sizes)
        self.usm = _settings(USMSettings, usm)
        self.blur1 = _settings(BlurSettings, blur1)
        self.stage1 = _settings(StageSettings, stage1)
        self.blur2 = _settings(BlurSettings, blur2)
        self.stage2 = _settings(StageSettings, stage2)
        self.final = _settings(FinalSettings, final)
        if self.stage2.resize_grid != "size":
            raise ValueError(
                f"stage2.resize_grid must be 'size' (the second order resizes to a size relative to the LR, "
                f"as BasicSR does), got {self.stage2.resize_grid!r}; the grid option is stage1.resize_grid."
            )
        if gt_size is not None and gt_size % self.scale:
            raise ValueError(f"gt_size={gt_size} must be a multiple of scale={self.scale}.")
        self.gt_size = gt_size
        if bucket_area_ratio < 1:
            raise ValueError(f"bucket_area_ratio must be >= 1, got {bucket_area_ratio}.")
        self.bucket_area_ratio = bucket_area_ratio
        if jpeg_codec not in JPEG_CODECS:
            raise ValueError(f"jpeg_codec must be one of {JPEG_CODECS}, got {jpeg_codec!r}.")
        self.jpeg_codec = jpeg_codec

    # ---------------------------------------------------------------- parameters (no images) --
    def _blur_params(self, blur: BlurSettings, count: int, gen, device) -> dict[str, Tensor]:
        sizes = torch.tensor(self.kernel_sizes, device=device)
        size = sizes[torch.randint(len(sizes), (count,), generator=gen, device=device)]
        kernel_type = _choice(blur.kernel_probs, count, gen, device)
        betag = _split_beta(blur.betag, count, gen, device)
        betap = _split_beta(blur.betap, count, gen, device)
        # Real-ESRGAN's sinc cutoff: [pi/3, pi] for kernels below 13 taps, [pi/5, pi] otherwise
        small = _uniform((math.pi / 3, math.pi), count, gen, device)
        large = _uniform((math.pi / 5, math.pi), count, gen, device)
        return {
            "size": size,
            "kernel_type": kernel_type,
            "sigma_x": _uniform(blur.sigma, count, gen, device),
            "sigma_y": _uniform(blur.sigma, count, gen, device),
            "rotation": _uniform((-math.pi, math.pi), count, gen, device),
            "beta": torch.where(kernel_type // 2 == 2, betap, betag),
            "sinc": torch.rand(count, generator=gen, device=device) < blur.sinc_prob,
            "cutoff": torch.where(size < 13, small, large),
        }

    def _stage_params(self, stage: StageSettings, count: int, gen, device) -> dict[str, Tensor]:
        direction = _choice(stage.resize_probs, count, gen, device)
        up = _uniform((1.0, stage.resize_range[1]), count, gen, device)
        down = _uniform((stage.resize_range[0], 1.0), count, gen, device)
        resize = torch.where(direction == 0, up, torch.where(direction == 1, down, torch.ones_like(up)))
        return {
            "blur": torch.rand(count, generator=gen, device=device) < stage.blur_prob,
            "direction": direction,
            "resize": resize,
            "mode": torch.randint(len(stage.resize_modes), (count,), generator=gen, device=device),
            "gaussian": torch.rand(count, generator=gen, device=device) < stage.gaussian_noise_prob,
            "sigma": _uniform(stage.noise_range, count, gen, device),
            "poisson_scale": _uniform(stage.poisson_scale_range, count, gen, device),
            "gray": torch.rand(count, generator=gen, device=device) < stage.gray_noise_prob,
            "jpeg": _uniform(stage.jpeg_range, count, gen, device),
        }

    def sample_params(self, count: int, generator: torch.Generator, device=None) -> dict[str, dict]:
        """All per-sample random choices of `count` samples, drawn from `generator` (no images)."""
        device = device if device is not None else generator.device
        final = self.final
        return {
            "blur1": self._blur_params(self.blur1, count, generator, device),
            "stage1": self._stage_params(self.stage1, count, generator, device),
            "blur2": self._blur_params(self.blur2, count, generator, device),
            "stage2": self._stage_params(self.stage2, count, generator, device),
            "final": {
                "sinc": torch.rand(count, generator=generator, device=device) < final.sinc_prob,
                "size": torch.tensor(final.sinc_kernel_sizes, device=device)[
                    torch.randint(len(final.sinc_kernel_sizes), (count,), generator=generator, device=device)
                ],
                "cutoff": math.pi * _uniform(final.cutoff_range, count, generator, device),
                "mode": torch.randint(len(final.resize_modes), (count,), generator=generator, device=device),
                "jpeg_first": torch.rand(count, generator=generator, device=device) < final.jpeg_first_prob,
                "jpeg": _uniform(self.stage2.jpeg_range, count, generator, device),
            },
        }

    def kernels(self, params: dict[str, Tensor]) -> Tensor:
        """``[B, K, K]`` blur kernels (K = the largest kernel size) from one stage's parameters."""
        return mixed_kernels(
            self.max_kernel_size,
            params["kernel_type"],
            params["size"],
            params["sigma_x"],
            params["sigma_y"],
            params["rotation"],
            params["beta"],
            params["sinc"],
            params["cutoff"],
        )

    def final_kernels(self, params: dict[str, Tensor]) -> Tensor:
        size = max(self.final.sinc_kernel_sizes)
        sinc = limit_support(circular_lowpass_kernel(size, params["cutoff"]), params["size"])
        pulse = pulse_kernel(len(sinc), size, sinc.device, sinc.dtype)
        return torch.where(params["sinc"][:, None, None], sinc, pulse)

    # ---------------------------------------------------------------------------- image ops --
    def sharpen(self, image: Tensor) -> Tensor:
        """Unsharp masking of the HR target; its Gaussian blur runs as two 1-D passes."""
        usm = self.usm
        taps = gaussian_kernel1d(usm.kernel_size, usm.sigma, image.device, image.dtype)
        residual = image - separable_blur(image, taps)
        mask = (residual.abs() * 255 > usm.threshold).to(image.dtype)
        soft_mask = separable_blur(mask, taps)
        sharp = torch.clamp(image + usm.weight * residual, 0, 1)
        return soft_mask * sharp + (1 - soft_mask) * image

    @staticmethod
    def add_noise(image: Tensor, params: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """Gaussian or Poisson noise per sample, colour or grey per sample, then clamp to [0, 1].

        Each of the four (type, colour) groups is computed only for its own samples.
        """
        out = torch.empty_like(image)
        gaussian, gray = params["gaussian"], params["gray"]
        for use_gaussian, use_gray in ((True, False), (True, True), (False, False), (False, True)):
            index = torch.nonzero((gaussian == use_gaussian) & (gray == use_gray)).flatten()
            if index.numel() == 0:
                continue
            x = image[index]
            if use_gaussian:
                shape = (x.shape[0], 1, *x.shape[2:]) if use_gray else x.shape
                noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
                noise = noise * (params["sigma"][index] / 255.0)[:, None, None, None]
            else:
                source = kornia.color.rgb_to_grayscale(x) if use_gray else x
                noise = poisson_noise(source, generator) * params["poisson_scale"][index][:, None, None, None]
            out[index] = torch.clamp(x + noise, 0, 1)
        return out

    def jpeg(self, image: Tensor, quality: Tensor) -> Tensor:
        """Clamp and JPEG round trip with per-sample quality (codec `jpeg_codec`)."""
        return jpeg_round_trip(image, quality, self.jpeg_codec)

    # -------------------------------------------------------------------------------- pipeline --
    def forward(self, hr: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        hr = crop_to_multiple(hr, self.scale)
        batch, _, height, width = hr.shape
        lr_size = (height // self.scale, width // self.scale)
        params = self.sample_params(batch, generator, hr.device)
        p1, p2, pf = params["stage1"], params["stage2"], params["final"]

        hr_target = self.sharpen(hr) if self.usm.enabled else hr
        # ----- first order: blur, resize, noise, JPEG
        kernels1 = self.kernels(params["blur1"]).to(hr.dtype)
        out = _where_subset(p1["blur"], hr_target, lambda s, y: blur(y, kernels1[s]))
        factors = p1["resize"].tolist()
        sizes = [(max(1, int(height * f)), max(1, int(width * f))) for f in factors]
        modes = [self.stage1.resize_modes[m] for m in p1["mode"].tolist()]
        whole = [(torch.arange(batch, device=hr.device), out, [(height, width)] * batch)]
        grid = factors if self.stage1.resize_grid == "scale_factor" else None
        buckets = resize_samples(whole, sizes, modes, self.bucket_area_ratio, scale_factors=grid)
        buckets = map_buckets(buckets, lambda i, x: self.add_noise(x, _take(p1, i), generator))
        buckets = map_buckets(buckets, lambda i, x: self.jpeg(x, p1["jpeg"][i]))
        # ----- second order: optional blur, resize relative to the LR size, noise
        kernels2 = self.kernels(params["blur2"]).to(hr.dtype)
        buckets = map_buckets(
            buckets, lambda i, x: _where_subset(p2["blur"][i], x, lambda s, y: blur(y, kernels2[i[s]]))
        )
        factors = p2["resize"].tolist()
        sizes = [(max(1, int(lr_size[0] * f)), max(1, int(lr_size[1] * f))) for f in factors]
        modes = [self.stage2.resize_modes[m] for m in p2["mode"].tolist()]
        buckets = resize_samples(buckets, sizes, modes, self.bucket_area_ratio)
        buckets = map_buckets(buckets, lambda i, x: self.add_noise(x, _take(p2, i), generator))
        # ----- final: [resize back + sinc] and JPEG in random order
        jpeg_first = pf["jpeg_first"]
        buckets = map_buckets(
            buckets, lambda i, x: _where_subset(jpeg_first[i], x, lambda s, y: self.jpeg(y, pf["jpeg"][i[s]]))
        )
        modes = [self.final.resize_modes[m] for m in pf["mode"].tolist()]
        ((index, out, _),) = resize_samples(buckets, [lr_size] * batch, modes, ratio=math.inf)
        out = out[torch.argsort(index)]
        out = blur(out, self.final_kernels(pf).to(hr.dtype))
        out = _where_subset(~jpeg_first, out, lambda s, y: self.jpeg(y, pf["jpeg"][s]))
        lr = quantize_8bit(out)
        if self.gt_size is not None:
            hr_target, lr = self.paired_random_crop(hr_target, lr, generator)
        return hr_target, lr

    def paired_random_crop(self, hr: Tensor, lr: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A `gt_size` HR crop and the matching LR crop, at a random position per sample."""
        lr_size = self.gt_size // self.scale
        if min(lr.shape[-2:]) < lr_size:
            raise ValueError(
                f"LR of size {tuple(lr.shape[-2:])} is smaller than the crop {lr_size} (gt_size)."
            )
        tops = torch.randint(
            lr.shape[-2] - lr_size + 1, (lr.shape[0],), generator=generator, device=lr.device
        )
        lefts = torch.randint(
            lr.shape[-1] - lr_size + 1, (lr.shape[0],), generator=generator, device=lr.device
        )
        hr_crops, lr_crops = [], []
        for b, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
            lr_crops.append(lr[b, :, top : top + lr_size, left : left + lr_size])
            hr_top, hr_left, size = top * self.scale, left * self.scale, self.gt_size
            hr_crops.append(hr[b, :, hr_top : hr_top + size, hr_left : hr_left + size])
        return torch.stack(hr_crops), torch.stack(lr_crops)


def _take(params: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {key: value[index] for key, value in params.items()}


def _where_subset(mask: Tensor, image: Tensor, fn) -> Tensor:
    """Apply ``fn(subset_index, image[subset])`` to the samples where `mask` holds."""
    subset = torch.nonzero(mask).flatten()
    if subset.numel() == 0:
        return image
    if subset.numel() == image.shape[0]:
        return fn(subset, image)
    out = image.clone()
    out[subset] = fn(subset, image[subset])
    return out


def separable_blur(image: Tensor, taps: Tensor) -> Tensor:
    """Filtering with the outer product ``taps ⊗ taps``, reflect borders, as two 1-D passes.

    All channels of all samples go through one grouped convolution per axis, several times
    faster on CPU than `kornia.filters.filter2d_separable`, which builds a batch of kernels.
    """
    batch, channels, height, width = image.shape
    half = taps.numel() // 2
    border = "reflect" if min(height, width) > half else "replicate"
    x = F.pad(image.reshape(1, batch * channels, height, width), (half, half, half, half), mode=border)
    weight = taps.to(image.dtype)
    x = F.conv2d(x, weight.view(1, 1, 1, -1).expand(batch * channels, 1, 1, -1), groups=batch * channels)
    x = F.conv2d(x, weight.view(1, 1, -1, 1).expand(batch * channels, 1, -1, 1), groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def blur(image: Tensor, kernel: Tensor) -> Tensor:
    """Per-sample 2-D filtering with reflect borders (replicate when the image is smaller than the
    kernel's half-width, where reflection is undefined)."""
    border = "reflect" if min(image.shape[-2:]) > kernel.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(image, kernel, border_type=border)


# A bucket: (sample indices [n], images [n, C, H, W] replicate-padded to a common size, valid sizes).
Bucket = tuple[Tensor, Tensor, list[tuple[int, int]]]


def make_buckets(images: list[Tensor], ratio: float) -> list[Bucket]:
    """Group ``[C, h, w]`` images of similar area; each group is padded to its largest size."""
    device = images[0].device
    order = sorted(range(len(images)), key=lambda i: -images[i].shape[-1] * images[i].shape[-2])
    groups: list[list[int]] = []
    for i in order:
        area = images[i].shape[-1] * images[i].shape[-2]
        first = groups[-1][0] if groups else None
        if first is not None and images[first].shape[-1] * images[first].shape[-2] <= ratio * area:
            groups[-1].append(i)
        else:
            groups.append([i])
    buckets = []
    for group in groups:
        height = max(images[i].shape[-2] for i in group)
        width = max(images[i].shape[-1] for i in group)
        padded = []
        for i in group:
            h, w = images[i].shape[-2:]
            x = images[i][None]
            if (h, w) != (height, width):
                x = F.pad(x, (0, width - w, 0, height - h), mode="replicate")
            padded.append(x)
        sizes = [tuple(images[i].shape[-2:]) for i in group]
        buckets.append((torch.tensor(group, device=device), torch.cat(padded), sizes))
    return buckets


def map_buckets(buckets: list[Bucket], fn) -> list[Bucket]:
    """Apply ``fn(sample_indices, images)`` to every bucket (the padding comes along)."""
    return [(index, fn(index, images), sizes) for index, images, sizes in buckets]


def resize_samples(
    buckets: list[Bucket],
    sizes: list[tuple[int, int]],
    modes: list[str],
    ratio: float,
    scale_factors: list[float] | None = None,
) -> list[Bucket]:
    """Resize each sample's valid region to ``sizes[i]`` with ``modes[i]``, then re-bucket.

    With `scale_factors`, sample i is resized by ``F.interpolate(scale_factor=scale_factors[i])``
    (output ``floor(h * s)``, source positions ``(o + 0.5) / s - 0.5``) instead of to ``sizes[i]``.
    """
    resized: list[Tensor | None] = [None] * len(sizes)
    for index, images, valid in buckets:
        for j, i in enumerate(index.tolist()):
            h, w = valid[j]
            mode = modes[i]
            kwargs = {} if mode == "area" else {"align_corners": False}
            if scale_factors is None:
                kwargs["size"] = sizes[i]
            else:
                kwargs["scale_factor"] = scale_factors[i]
            resized[i] = F.interpolate(images[j : j + 1, :, :h, :w], mode=mode, **kwargs)[0]
    return make_buckets(resized, ratio)
