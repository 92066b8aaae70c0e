"""Degradations: parameter statistics, determinism, shapes, and the maths of the individual steps."""

from __future__ import annotations

import math

import hydra
import kornia
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from addsr_pl.data import degradation as D
from addsr_pl.data.jpeg import basicsr_jpeg, kornia_jpeg
from addsr_pl.data.kernels import KERNEL_TYPES
from addsr_pl.paths import config_dir

DRAWS = 4000


def degradation_config(name: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "data/folder", overrides=["+seed=0", "data.train.root=unused", f"data/degradation={name}"]
        )
    return cfg.data.degradation


@pytest.fixture(scope="module")
def addsr() -> D.RealESRGANDegradation:
    return hydra.utils.instantiate(degradation_config("addsr"))


@pytest.fixture(scope="module")
def params(addsr):
    return addsr.sample_params(DRAWS, torch.Generator().manual_seed(0))


def assert_share(flags: torch.Tensor, p: float) -> None:
    """Empirical share within 4.5 binomial standard deviations of p (fixed seed: not flaky)."""
    n = flags.numel()
    tolerance = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9
    assert abs(flags.float().mean().item() - p) <= tolerance, (flags.float().mean().item(), p, tolerance)


def test_kernel_type_and_sinc_shares_match_the_config(addsr, params):
    for blur, settings in (("blur1", addsr.blur1), ("blur2", addsr.blur2)):
        for index, p in enumerate(settings.kernel_probs):
            assert_share(params[blur]["kernel_type"] == index, p)
        assert_share(params[blur]["sinc"], settings.sinc_prob)
        for size in addsr.kernel_sizes:
            assert_share(params[blur]["size"] == size, 1 / len(addsr.kernel_sizes))


def test_resize_direction_noise_type_and_order_shares_match_the_config(addsr, params):
    for stage, settings in (("stage1", addsr.stage1), ("stage2", addsr.stage2)):
        p = params[stage]
        for index, prob in enumerate(settings.resize_probs):
            assert_share(p["direction"] == index, prob)
        assert_share(p["gaussian"], settings.gaussian_noise_prob)
        assert_share(p["gray"], settings.gray_noise_prob)
        for index in range(len(settings.resize_modes)):
            assert_share(p["mode"] == index, 1 / len(settings.resize_modes))
    assert_share(params["stage2"]["blur"], addsr.stage2.blur_prob)
    assert_share(params["final"]["sinc"], addsr.final.sinc_prob)
    assert_share(params["final"]["jpeg_first"], addsr.final.jpeg_first_prob)


def test_sampled_values_stay_in_their_configured_ranges(addsr, params):
    s1 = params["stage1"]
    up, down, keep = (s1["direction"] == i for i in range(3))
    assert (s1["resize"][up] >= 1).all() and (s1["resize"][up] <= addsr.stage1.resize_range[1]).all()
    assert (s1["resize"][down] <= 1).all() and (s1["resize"][down] >= addsr.stage1.resize_range[0]).all()
    assert (s1["resize"][keep] == 1).all()
    lo, hi = addsr.stage1.noise_range
    assert s1["sigma"].min() >= lo and s1["sigma"].max() <= hi
    lo, hi = addsr.stage1.jpeg_range
    assert s1["jpeg"].min() >= lo and s1["jpeg"].max() <= hi
    b1 = params["blur1"]
    plateau = b1["kernel_type"] // 2 == 2
    assert (
        b1["beta"][plateau].min() >= addsr.blur1.betap[0]
        and b1["beta"][plateau].max() <= addsr.blur1.betap[1]
    )
    assert (
        b1["beta"][~plateau].min() >= addsr.blur1.betag[0]
        and b1["beta"][~plateau].max() <= addsr.blur1.betag[1]
    )
    # beta lands below 1 half of the time (BasicSR's split draw)
    assert_share(b1["beta"][~plateau] < 1, 0.5)
    small = b1["size"] < 13
    assert b1["cutoff"][small].min() >= math.pi / 3 and b1["cutoff"][~small].min() >= math.pi / 5
    assert params["final"]["cutoff"].min() >= math.pi / 3 and params["final"]["cutoff"].max() <= math.pi


@pytest.mark.parametrize("name", ["addsr", "realesrgan"])
def test_same_seed_is_bit_identical_and_seeds_differ(name):
    module = hydra.utils.instantiate(degradation_config(name))
    hr = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    first = module(hr, torch.Generator().manual_seed(5))
    second = module(hr, torch.Generator().manual_seed(5))
    other = module(hr, torch.Generator().manual_seed(6))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(("height", "width"), [(67, 93), (64, 64), (41, 130)])
def test_shapes_dtype_and_range_for_odd_sizes(addsr, height, width):
    hr = torch.rand(4, 3, height, width, generator=torch.Generator().manual_seed(2))
    for module in (addsr, D.BicubicDegradation(4)):
        target, lr = module(hr, torch.Generator().manual_seed(3))
        h, w = height - height % 4, width - width % 4
        assert target.shape == (4, 3, h, w) and lr.shape == (4, 3, h // 4, w // 4)
        assert target.dtype == lr.dtype == torch.float32
        assert target.min() >= 0 and target.max() <= 1 and lr.min() >= 0 and lr.max() <= 1
        torch.testing.assert_close(lr * 255, (lr * 255).round(), atol=1e-4, rtol=0)


def test_usm_switch_and_constant_images():
    hr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    off = D.RealESRGANDegradation(4, usm={"enabled": False})
    assert torch.equal(off(hr, torch.Generator().manual_seed(0))[0], hr)
    on = D.RealESRGANDegradation(4)
    assert not torch.equal(on(hr, torch.Generator().manual_seed(0))[0], hr)
    flat = torch.full((1, 3, 64, 64), 0.3)
    torch.testing.assert_close(on.sharpen(flat), flat)


def test_usm_closed_form_on_a_step_edge():
    """USM = img + weight * (img - blur) where the residual exceeds the threshold (mask blurred)."""
    module = D.RealESRGANDegradation(4, usm={"kernel_size": 5, "sigma": 1.0, "weight": 0.5, "threshold": 10})
    image = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    image[..., 8:] = 0.5
    taps = D.gaussian_kernel1d(5, 1.0, dtype=torch.float64)
    blurred = kornia.filters.filter2d(image, (taps[:, None] * taps[None])[None], border_type="reflect")
    residual = image - blurred
    soft = kornia.filters.filter2d(
        (residual.abs() * 255 > 10).double(), (taps[:, None] * taps[None])[None], border_type="reflect"
    )
    expected = soft * torch.clamp(image + 0.5 * residual, 0, 1) + (1 - soft) * image
    torch.testing.assert_close(module.sharpen(image), expected, atol=1e-12, rtol=0)


def test_separable_blur_equals_the_2d_filter():
    image = torch.rand(2, 3, 40, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    taps = D.gaussian_kernel1d(11, 2.0, dtype=torch.float64)
    expected = kornia.filters.filter2d(image, (taps[:, None] * taps[None])[None], border_type="reflect")
    torch.testing.assert_close(D.separable_blur(image, taps), expected, atol=1e-12, rtol=0)


def test_gray_noise_is_equal_across_channels_and_colour_noise_is_not():
    image = torch.full((4, 3, 32, 32), 0.5)
    params = {
        "gaussian": torch.tensor([True, True, False, False]),
        "gray": torch.tensor([True, False, True, False]),
        "sigma": torch.full((4,), 5.0),
        "poisson_scale": torch.full((4,), 0.2),
    }
    noisy = D.RealESRGANDegradation.add_noise(image, params, torch.Generator().manual_seed(0))
    noise = noisy - image
    for b, gray in enumerate(params["gray"].tolist()):
        same = torch.equal(noise[b, 0], noise[b, 1]) and torch.equal(noise[b, 1], noise[b, 2])
        assert same == gray
    # Gaussian sigma is in 8-bit levels
    assert abs(noise[1].std().item() - 5 / 255) < 0.1 * 5 / 255


def test_poisson_noise_uses_the_next_power_of_two_above_the_level_count():
    image = torch.zeros(1, 1, 8, 8)
    image[..., :4, :] = 100 / 255  # 2 levels -> 2 photons per unit intensity
    assert D.unique_levels(image).tolist() == [2]
    noise = D.poisson_noise(image, torch.Generator().manual_seed(0))
    # noisy values are k / 2 for integer photon counts k
    torch.testing.assert_close(((image + noise) * 2).round(), (image + noise) * 2, atol=1e-5, rtol=0)


def test_paired_random_crop_keeps_the_pair_aligned():
    module = D.RealESRGANDegradation(4, gt_size=16)
    hr = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    lr = hr[..., ::4, ::4]
    hr_crop, lr_crop = module.paired_random_crop(hr, lr, torch.Generator().manual_seed(1))
    assert hr_crop.shape == (3, 3, 16, 16) and lr_crop.shape == (3, 3, 4, 4)
    assert torch.equal(hr_crop[..., ::4, ::4], lr_crop)


def test_bicubic_is_the_antialiased_downscale():
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target, lr = D.BicubicDegradation(4)(hr)
    expected = torch.nn.functional.interpolate(hr, size=(8, 8), mode="bicubic", antialias=True)
    assert torch.equal(target, hr)
    torch.testing.assert_close(lr, D.quantize_8bit(expected))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"stage1": {"resize_probs": [0.5, 0.6, 0.1]}}, "resize_probs"),
        ({"blur1": {"sigma": [3.0, 0.2]}}, "sigma"),
        ({"stage2": {"jpeg_range": [30, 120]}}, "jpeg_range"),
        ({"kernel_sizes": [7, 8]}, "kernel_sizes"),
        ({"final": {"cutoff_range": [0.2, 1.5]}}, "cutoff_range"),
        ({"final": {"sinc_kernel_sizes": [7, 10]}}, "sinc_kernel_sizes"),
        ({"stage1": {"resize_grid": "corners"}}, "resize_grid"),
        ({"jpeg_codec": "libjpeg"}, "jpeg_codec"),
    ],
)
def test_bad_settings_fail_with_the_key_in_the_message(override, message):
    cfg = OmegaConf.merge(degradation_config("addsr"), override)
    with pytest.raises(Exception, match=message):
        hydra.utils.instantiate(cfg)


def test_kernel_types_are_listed_in_their_fixed_order():
    assert KERNEL_TYPES[0] == "iso" and len(KERNEL_TYPES) == 6
    with pytest.raises(ValueError, match="kernel_types"):
        D.BlurSettings(kernel_types=["aniso", "iso", *KERNEL_TYPES[2:]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_batch_device_with_a_device_generator(addsr):
    hr = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0)).cuda()
    module = addsr.cuda()
    first = module(hr, torch.Generator(device="cuda").manual_seed(1))
    second = module(hr, torch.Generator(device="cuda").manual_seed(1))
    assert first[1].device.type == "cuda" and first[1].shape == (4, 3, 32, 32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_final_sinc_support_is_drawn_from_its_sizes(addsr, params):
    sizes = params["final"]["size"]
    for size in addsr.final.sinc_kernel_sizes:
        assert_share(sizes == size, 1 / len(addsr.final.sinc_kernel_sizes))
    few = {key: value[:64] for key, value in params["final"].items()}
    kernels = addsr.final_kernels(few)
    grid = kernels.shape[-1]
    for kernel, size, sinc in zip(kernels, few["size"].tolist(), few["sinc"].tolist()):
        torch.testing.assert_close(kernel.sum(), torch.tensor(1.0))
        inside = torch.zeros(grid, grid, dtype=torch.bool)
        lo = (grid - size) // 2 if sinc else grid // 2
        hi = lo + (size if sinc else 1)
        inside[lo:hi, lo:hi] = True
        assert (kernel[~inside] == 0).all() and (kernel[inside] != 0).any()


def _lr(overrides: dict, seed: int = 4) -> torch.Tensor:
    module = hydra.utils.instantiate(OmegaConf.merge(degradation_config("addsr"), overrides))
    hr = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return module(hr, torch.Generator().manual_seed(seed))[1]


def test_first_blur_probability_and_final_jpeg_range_change_the_output():
    base = _lr({})
    # stage 1 without blur: every sample's LR changes (the draws stay the same)
    unblurred = _lr({"stage1": {"blur_prob": 0.0}})
    assert all(not torch.equal(a, b) for a, b in zip(base, unblurred))
    # the final JPEG draws its quality from stage2.jpeg_range (BasicSR's jpeg_range2)
    mild = _lr({"stage2": {"jpeg_range": [95.0, 95.0]}})
    harsh = _lr({"stage2": {"jpeg_range": [5.0, 5.0]}})
    assert all(not torch.equal(a, b) for a, b in zip(mild, harsh))


def test_scale_factor_grid_is_interpolate_with_the_scale_factor():
    image = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    whole = [(torch.arange(1), image, [(50, 70)])]
    for mode in ("bilinear", "bicubic", "area"):
        ((_, by_factor, _),) = D.resize_samples(whole, [(21, 29)], [mode], 1.0, scale_factors=[0.42])
        expected = torch.nn.functional.interpolate(image, scale_factor=0.42, mode=mode)
        assert torch.equal(by_factor, expected)
        ((_, by_size, _),) = D.resize_samples(whole, [(21, 29)], [mode], 1.0)
        assert by_size.shape == by_factor.shape
        assert mode == "area" or not torch.equal(by_size, by_factor)
    with pytest.raises(ValueError, match="stage2.resize_grid"):
        D.RealESRGANDegradation(4, stage2={"resize_grid": "scale_factor"})


@pytest.mark.parametrize("codec", ["basicsr", "kornia"])
def test_jpeg_codec_is_the_configured_one(codec):
    module = hydra.utils.instantiate(OmegaConf.merge(degradation_config("addsr"), {"jpeg_codec": codec}))
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    quality = torch.tensor([35.0, 70.0])
    expected = basicsr_jpeg(image, quality) if codec == "basicsr" else kornia_jpeg(image, quality)
    assert torch.equal(module.jpeg(image, quality), expected)
