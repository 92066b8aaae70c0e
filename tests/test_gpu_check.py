"""`bash bench/gpu_check.sh --smoke`: the GPU check's whole script on the CPU, so it never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    if (ROOT / ".venv" / "bin" / "python").exists():
        del env["PYTHON"]  # the script finds the project's .venv by itself
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke"],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {"inference", "degradation", "train_step", "graph_breaks", "gpu_tests"} <= set(result)
    check_train_step_rows(result["train_step"])  # the merged file holds each section's JSON
    gpu_tests = result["gpu_tests"]
    assert gpu_tests["returncode"] == 0 and gpu_tests["skipped"] == len(gpu_tests["tests"]) >= 1
    assert result["graph_breaks"] == {
        "seesr_denoiser_step": 0,
        "seesr_whole_sampler": 0,
        "seesr_whole_call": 0,
    }
    rows = result["inference"]["seesr"]["models"]["tiny_seesr"]["rows"]
    assert {(r["row"], r["steps"]) for r in rows} == {
        (row, steps)
        for row in ("eager_fp16", "eager_bf16", "ours_eager", "ours_graph_tiny_psr")
        for steps in (1, 2)
    }
    assert all(r["median_ms"] > 0 for r in rows)
    model = result["inference"]["seesr"]["models"]["tiny_seesr"]
    assert {"denoiser_step_ms", "vae_decode_ms", "vae_encode_ms", "tagger_ms"} <= set(model["breakdown"])
    assert model["tiled"]["sr"] == 64
    assert model["throughput"]["batch"] == 8 and model["throughput"]["folder_images_per_s"] > 0
    assert result["degradation"]["pairs_per_s"]["batched"]["median"] > 0
    # bench/ddp_scaling.py: one process, then two (gloo); only the second all-reduces
    one, two = result["ddp_scaling"]["runs"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert one["allreduce_mib_per_iteration"] == 0 < two["allreduce_mib_per_iteration"]
    assert result["ddp_scaling"]["efficiency"] == pytest.approx(
        two["samples_per_s"] / (2 * one["samples_per_s"])
    )
    assert "| tiny_seesr | ours_eager | 1 |" in (tmp_path / "out" / "gpu_check.md").read_text()


def check_train_step_rows(result: dict) -> None:
    """bench/train_step.py --tiny's JSON: the baseline's and our rows, each with its FLOP count (one extra,
    untimed iteration), the share of a card's peak (none on the CPU) and the paper's hours."""
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    assert [(r["name"], r["batch"]) for r in result["rows"]] == [("baseline", 2), ("ours", 2)]
    for r in result["rows"]:
        assert r["samples_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_iteration"])
        assert r["peak_gib"] is None  # not measured on the CPU
        # a training iteration of the tiny preset is tens of MFLOP
        assert 1e-5 < r["tflop_per_iteration"] < 1e-1
        assert r["achieved_tflops"] == pytest.approx(r["tflop_per_iteration"] * 1000 / r["ms_per_iteration"])
        assert r["share_of_bf16_peak"] is None  # no card
        assert r["paper_hours"] == pytest.approx(300_000 / r["samples_per_s"] / 3600)
    assert result["ratio_samples_per_s"] == pytest.approx(
        result["rows"][1]["samples_per_s"] / result["rows"][0]["samples_per_s"]
    )
    assert result["largest_batch_under_cap"] == 2
    plan = result["memory_plan"]
    assert plan["levers"]["share_frozen_weights"] is True
    assert plan["components"][0]["name"] == "student (trained)"
