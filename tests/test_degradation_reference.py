"""The `addsr` degradation against BasicSR's own pipeline, as a distribution on fixed crops.

The reference medians in tests/data/basicsr_degradation_reference.json were produced by running
BasicSR 1.4.2 itself (`bench/basicsr_degradation_reference.py`, which documents how); no code of
addsr_pl took part. Both sides degrade the same fixed HR crops and are scored by the same statistics
(defined once, in that script): PSNR of the LR against the bicubic downscale, and the variance of
the Laplacian of the LR's luma and chroma.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from addsr_pl.paths import config_dir

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "basicsr_degradation_reference.json"
# degradations per crop on our side (13 crops)
REPEATS = 20
PSNR_TOLERANCE_DB = 0.3
DETAIL_TOLERANCE = 0.25


def _statistics_module():
    spec = importlib.util.spec_from_file_location(
        "basicsr_reference", ROOT / "bench" / "basicsr_degradation_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _degradation(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "data/folder",
            overrides=["+seed=0", "data.train.root=unused", "data/degradation=addsr", *overrides],
        )
    return hydra.utils.instantiate(cfg.data.degradation)


def _medians(stats, overrides: list[str]) -> dict[str, float]:
    hr = stats.fixed_crops()
    batch = hr.repeat(REPEATS, 1, 1, 1)
    module = _degradation(overrides)
    generator = torch.Generator().manual_seed(0)
    lr = torch.cat([module(batch[i : i + 65], generator)[1] for i in range(0, len(batch), 65)])
    return stats.medians(stats.lr_statistics(batch, lr))


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def stats(reference):
    module = _statistics_module()
    assert [list(c) for c in module.CROPS] == reference["crops"] and reference["crop"] == module.CROP
    return module


def test_addsr_degradation_matches_basicsr_on_fixed_crops(stats, reference):
    ours, theirs = _medians(stats, []), reference["medians"]
    assert abs(ours["psnr_vs_bicubic"] - theirs["psnr_vs_bicubic"]) <= PSNR_TOLERANCE_DB, (ours, theirs)
    for key in ("luma_detail", "chroma_detail"):
        assert abs(ours[key] / theirs[key] - 1) <= DETAIL_TOLERANCE, (key, ours, theirs)
