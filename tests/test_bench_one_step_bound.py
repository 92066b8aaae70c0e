"""bench/one_step_bound.py: the supervised 1-step bound scores the held-out pairs as the demo does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from addsr_pl.core.sampler import upscale
from addsr_pl.data.datasets import SamplePairedDataset
from addsr_pl.paths import config_dir

BENCH = Path(__file__).parents[1] / "bench" / "one_step_bound.py"


@pytest.mark.parametrize(("prediction", "data"), [("epsilon", "sample"), ("v", "documents")])
def test_a_short_run_writes_its_curve_and_bicubic_of_the_held_out_pairs(tmp_path, prediction, data):
    out = tmp_path / "bound.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--prediction", prediction, "--minutes", "0.01", "--widths", "32,32",
         "--crop", "32", "--batch", "2", "--eval-every", "1000", "--data", data, "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["prediction"] == prediction and result["factor"] == 8 and result["data"] == data
    last = result["curve"][-1]
    assert last["iteration"] >= 1 and last["psnr_1step"] == result["best_psnr_1step"]
    if data == "documents":
        pairs = instantiate(OmegaConf.load(config_dir() / "demo.yaml").evaluation.dataset)
    else:
        pairs = SamplePairedDataset(["chelsea", "rocket", "coffee"], 128, 4)
    bicubic = [
        float(-10 * torch.log10((upscale(p["lr"][None], p["hr"].shape[-2:]) - p["hr"][None]).pow(2).mean()))
        for p in pairs
    ]
    assert result["psnr_bicubic"] == pytest.approx(sum(bicubic) / len(bicubic), abs=1e-4)
    assert "1-step PSNR" in run.stdout
