"""Metric suite: PSNR/SSIM against independent numpy formulas, random-weight MUSIQ, missing-file errors."""

import sys

import numpy as np
import pytest
import torch

from addsr_pl.evaluation import metrics
from addsr_pl.evaluation.metrics import METRICS, MetricSuite, MissingWeightsError, create_metric

SCALE = 4


def _pair(batch=2, size=48):
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(batch, 3, size, size, generator=generator)
    sr = (hr + 0.08 * torch.randn(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return sr, hr


def _y(images: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] of RGB in [0, 1] (MATLAB's rgb2ycbcr), images [B, 3, H, W]."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def _psnr_y(sr, hr, border):
    crop = (slice(None), slice(border, -border), slice(border, -border))
    diff = (_y(sr) - _y(hr))[crop] / 255
    return 10 * np.log10(1 / (diff**2).mean(axis=(1, 2)))


def _ssim_y(sr, hr, border, clip_cs=False):
    """Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), 'valid' filtering, 8-bit luma.

    `clip_cs` clips the contrast-structure term at zero, as pyiqa does (its only departure from
    MATLAB/BasicSR; it shows where local structure is anti-correlated, i.e. for poor outputs)."""
    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def filt(x):
        windows = np.lib.stride_tricks.sliding_window_view(x, (11, 11), axis=(1, 2))
        return (windows * window).sum(axis=(-1, -2))

    crop = (slice(None), slice(border, -border), slice(border, -border))
    x, y = np.round(_y(sr))[crop], np.round(_y(hr))[crop]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    if clip_cs:
        cs = np.maximum(cs, 0)
    return (((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs).mean(axis=(1, 2))


def test_psnr_and_ssim_on_y_match_independent_formulas(tmp_path):
    sr, hr = _pair()
    suite = MetricSuite(["psnr", "ssim"], scale=SCALE, weights_dir=tmp_path)
    scores = suite(sr, hr)
    sr64, hr64 = sr.double().numpy(), hr.double().numpy()
    assert scores["psnr"].shape == (2,)
    np.testing.assert_allclose(scores["psnr"].numpy(), _psnr_y(sr64, hr64, SCALE), atol=1e-4)
    np.testing.assert_allclose(scores["ssim"].numpy(), _ssim_y(sr64, hr64, SCALE), atol=1e-4)
    # the border really is cropped: changing it moves nothing
    spoiled = sr.clone()
    spoiled[..., :SCALE, :] = 1 - spoiled[..., :SCALE, :]
    assert torch.allclose(suite(spoiled, hr)["psnr"], scores["psnr"])


def test_full_reference_metrics_are_skipped_without_hr(tmp_path):
    sr, _ = _pair(batch=1, size=64)
    suite = MetricSuite(["psnr", "musiq"], scale=SCALE, weights_dir=tmp_path, pretrained=False)
    scores = suite(sr)
    assert set(scores) == {"musiq"}
    assert scores["musiq"].shape == (1,) and torch.isfinite(scores["musiq"]).all()


def test_lower_is_better_agrees_with_pyiqa():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for spec in METRICS.values():
        config = DEFAULT_CONFIGS[spec.pyiqa_name]
        assert spec.lower_is_better == config.get("lower_better", False), spec.pyiqa_name
        assert spec.full_reference == (config["metric_mode"] == "FR"), spec.pyiqa_name


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("lpips", "checkpoints/alexnet-owt-7be5be79.pth"),
        ("dists", "checkpoints/vgg16-397923af.pth"),
        ("niqe", "pyiqa/niqe_modelparameters.mat"),
        ("musiq", "pyiqa/musiq_koniq_ckpt-e95806b9.pth"),
        ("maniqa", "pyiqa/MANIQA_PIPAL-ae6d356b.pth"),
        ("clipiqa", "clip/RN50.pt"),
    ],
)
def test_missing_weight_file_is_named(tmp_path, name, missing):
    with pytest.raises(MissingWeightsError) as error:
        create_metric(name, scale=SCALE, weights_dir=tmp_path)
    assert str(tmp_path / missing) in str(error.value)


def test_lpips_checkpoint_is_required_after_its_backbone(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/alexnet-owt-7be5be79.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="LPIPS_v0.1_alex-df73285e.pth"):
        create_metric("lpips", scale=SCALE, weights_dir=tmp_path)


def test_maniqa_needs_its_timm_backbone_in_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "pyiqa").mkdir()
    (tmp_path / "pyiqa/MANIQA_PIPAL-ae6d356b.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="vit_base_patch8_224"):
        create_metric("maniqa", scale=SCALE, weights_dir=tmp_path)


def test_clip_file_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip/RN50.pt").write_bytes(b"not the model")
    with pytest.raises(MissingWeightsError, match="SHA-256"):
        create_metric("clipiqa", scale=SCALE, weights_dir=tmp_path)


def test_openai_clip_imports_without_leaving_a_pkg_resources_module():
    had_pkg_resources = "pkg_resources" in sys.modules
    metrics._import_openai_clip()
    assert "clip" in sys.modules
    assert ("pkg_resources" in sys.modules) == had_pkg_resources


def test_unknown_metric_and_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="Unknown metric 'fid'"):
        MetricSuite(["fid"], scale=SCALE, weights_dir=tmp_path)
    suite = MetricSuite(["psnr"], scale=SCALE, weights_dir=tmp_path)
    with pytest.raises(ValueError, match="same shape"):
        suite(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


def test_lpips_is_built_from_local_files_only(tmp_path):
    """Weights written here (random, of the right layout) are what the metric ends up with."""
    import torchvision
    from pyiqa.archs.lpips_arch import LPIPS

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "pyiqa").mkdir()
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(alexnet, tmp_path / "checkpoints/alexnet-owt-7be5be79.pth")
    with metrics._torch_hub_dir(tmp_path):
        reference = LPIPS(pretrained=False)
    # the released file holds lin0..lin4 (`lins` is the same modules under a second name)
    linear = {
        k: torch.rand_like(v)
        for k, v in reference.state_dict().items()
        if k.startswith("lin") and "lins" not in k
    }
    torch.save(linear, tmp_path / "pyiqa/LPIPS_v0.1_alex-df73285e.pth")

    metric = create_metric("lpips", scale=SCALE, weights_dir=tmp_path)
    state = metric.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in linear.items())
    assert torch.equal(state["net.slice1.0.weight"], alexnet["features.0.weight"])
    sr, hr = _pair(batch=1, size=64)
    score = MetricSuite(["lpips"], scale=SCALE, weights_dir=tmp_path)(sr, hr)["lpips"]
    assert score.shape == (1,) and score.item() > 0


def test_every_missing_file_is_listed_at_once_with_the_metrics_that_need_none(tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        MetricSuite(["psnr", "lpips", "niqe"], SCALE, weights_dir=tmp_path)
    text = str(error.value)
    assert str(tmp_path / "checkpoints/alexnet-owt-7be5be79.pth") in text
    assert str(tmp_path / "pyiqa/niqe_modelparameters.mat") in text
    assert "2 of metrics.names" in text and "metrics.names=[psnr,ssim] needs no weight file" in text


@pytest.mark.parametrize(
    ("names", "asked", "expected"),
    [
        (["psnr", "ssim"], ("psnr", "clipiqa"), ("psnr", "ssim")),
        (["psnr", "ssim"], ("psnr", "ssim"), ("psnr", "ssim")),
        (["ssim", "psnr"], ("lpips", "clipiqa"), ("ssim", "psnr")),
        (["psnr"], ("psnr", "clipiqa"), None),
    ],
)
def test_the_perception_distortion_plot_uses_the_metrics_present(tmp_path, names, asked, expected):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from addsr_pl.evaluation.runner import Evaluation

    run = SimpleNamespace(
        suite=MetricSuite(names, SCALE, weights_dir=tmp_path),
        cfg=OmegaConf.create({"pd_plot": {"x_metric": asked[0], "y_metric": asked[1]}}),
    )
    assert Evaluation.pd_axes(run) == expected
