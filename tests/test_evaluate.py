"""The evaluation protocol on the embedded sample set with the tiny student."""

import csv

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from test_metrics import _psnr_y, _ssim_y

from addsr_pl.core.sampler import upscale
from addsr_pl.data.datasets import SamplePairedDataset
from addsr_pl.evaluate import evaluate
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.paths import config_dir
from addsr_pl.upscale import parser, settings_from


def compose_eval(tmp_path, overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("eval", overrides=[f"hydra.run.dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


@pytest.fixture(scope="module")
def evaluation(tiny_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = compose_eval(
        out,
        [
            f"student={tiny_student}",
            "steps=[1,2]",
            "metrics.names=[psnr,ssim]",
            "pd_plot.y_metric=ssim",
            "datasets.sample.names=[chelsea,rocket]",
            "datasets.sample.crop_size=64",
        ],
    )
    return out, evaluate(cfg)


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluation_writes_the_tables_the_plot_and_the_timings(evaluation):
    out, paths = evaluation
    for kind in ("markdown", "csv", "per_image", "records", "pd_plot", "timing_csv", "timing_markdown"):
        assert paths[kind].is_file(), kind
    table = paths["markdown"].read_text()
    assert "Bicubic" in table and "AddSR-1" in table and "AddSR-2" in table
    assert "PSNR" in table and "SSIM" in table
    assert (out / "images" / "AddSR-2" / "sample" / "rocket.png").is_file()
    timing = rows(paths["timing_csv"])
    assert {r["method"] for r in timing} == {"AddSR-1", "AddSR-2"}


def test_psnr_and_ssim_match_independent_computations(evaluation, tiny_student):
    _, paths = evaluation
    records = {(r["method"], r["steps"], r["image"]): r for r in rows(paths["records"])}
    pairs = SamplePairedDataset(["chelsea", "rocket"], 64, 4)
    upscaler = Upscaler(
        AddSRPipeline.from_folder(tiny_student),
        settings_from(parser().parse_args(["x", "-o", "y", "--model", "m", "--steps", "2"])),
    )
    for item in pairs:
        lr, hr = item["lr"][None], item["hr"][None]
        bicubic = upscale(lr, hr.shape[-2:])
        student = upscaler.upscale_tensor(lr)
        for method, steps, sr in (("Bicubic", "", bicubic), ("AddSR", "2", student)):
            record = records[(method, steps, item["name"])]
            sr64, hr64 = sr.double().clamp(0, 1).numpy(), hr.double().numpy()
            expected_psnr = _psnr_y(sr64, hr64, 4)[0]
            expected_ssim = _ssim_y(sr64, hr64, 4, clip_cs=True)[0]  # pyiqa's SSIM
            assert float(record["psnr"]) == pytest.approx(expected_psnr, abs=1e-4)
            assert float(record["ssim"]) == pytest.approx(expected_ssim, abs=1e-4), method
        assert not torch.equal(bicubic, student)
