"""bench/train_step.py's plans and fits (its tiny run's rows: tests/test_gpu_check.py, which runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "train_step.py"


def test_the_plan_only_run_gives_the_seesr_size_counts_without_allocating_weights(tmp_path):
    out = tmp_path / "plan.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "seesr", "--plan-only", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {c["name"]: c for c in json.loads(out.read_text())["memory_plan"]["components"]}
    # SeeSR's trainable set (image attentions + ControlNet conditioning embedding) and its UNet + ControlNet
    assert rows["student (trained)"]["trainable_m"] == pytest.approx(386.7, abs=0.05)
    assert rows["teacher UNet + ControlNet"]["params_m"] == pytest.approx(1126.8 + 489.0, abs=0.1)
    assert rows["student (frozen, own)"]["params_m"] == 0
    assert rows["tagger"]["params_m"] == pytest.approx(212.1, abs=0.05)


def test_the_fixed_and_per_sample_parts_are_the_least_squares_line_over_batches():
    sys.path.insert(0, str(BENCH.parent))
    try:
        from train_step import fixed_and_per_sample
    finally:
        sys.path.remove(str(BENCH.parent))
    rows = [
        {"name": "ours", "batch": 2, "ms_per_iteration": 940 + 2 * 210},
        {"name": "ours", "batch": 4, "ms_per_iteration": 940 + 4 * 210},
        {"name": "ours", "batch": 8, "ms_per_iteration": 940 + 8 * 210},
        {"name": "baseline", "batch": 2, "ms_per_iteration": 1085},
    ]
    fits = fixed_and_per_sample(rows)
    assert set(fits) == {"ours"}  # one batch gives no line
    assert fits["ours"]["fixed_ms"] == pytest.approx(940)
    assert fits["ours"]["per_sample_ms"] == pytest.approx(210)


# Public element counts (the checkpoints' safetensors, in millions): SDXL base's UNet, the SDXL ControlNet
# diffusers initialises from it (as controlnet-canny-sdxl-1.0), the VAE, CLIP-L (no projection) + CLIP-G;
# SD3.5-medium's transformer (its 226.5 M-element positional embedding is a buffer), SD3's VAE, CLIP-L,
# CLIP-G (both with projections) and T5-XXL's encoder.
SDXL_UNET, SDXL_CONTROLNET, SDXL_VAE, SDXL_TEXT = 2567.463684, 1251.014160, 83.653863, 817.720320
SD35_TRANSFORMER, SD3_VAE = 2469.663936, 83.819683
SD3_TEXT = 123.650304 + 694.659840 + 4762.310656
SD3_POS_EMBED = 384 * 384 * 1536 / 1e6  # pos_embed_max_size² x the transformer's width


def plan_only(preset: str, tmp_path, monkeypatch, trainable: str = "controlnet") -> dict:
    """bench/train_step.py --plan-only --trainable <trainable>, in this process (its imports are paid once)."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from train_step import main
    finally:
        sys.path.remove(str(BENCH.parent))
    out = tmp_path / "plan.json"
    argv = [str(BENCH), "--preset", preset, "--plan-only", "--trainable", trainable, "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    return json.loads(out.read_text())


def test_the_sdxl_plan_has_the_public_sdxl_base_sizes(tmp_path, monkeypatch):
    result = plan_only("sdxl", tmp_path, monkeypatch)
    rows = {c["name"]: c for c in result["memory_plans"]["controlnet"]["components"]}
    # trainable=controlnet: the student's own ControlNet is trained whole
    assert rows["student (trained)"]["trainable_m"] == pytest.approx(SDXL_CONTROLNET, abs=0.1)
    assert rows["teacher UNet + ControlNet"]["params_m"] == pytest.approx(
        SDXL_UNET + SDXL_CONTROLNET, abs=0.1
    )
    assert rows["VAE"]["params_m"] == pytest.approx(SDXL_VAE, abs=0.1)
    assert rows["text encoder"]["params_m"] == pytest.approx(SDXL_TEXT, abs=0.1)
    fit = result["static_fits"]["controlnet"]
    static = result["memory_plans"]["controlnet"]["device_gib"]
    assert fit["static_gib"] == static
    assert fit["left_for_activations_gib"] == pytest.approx(
        {"24": 24 - static, "40": 40 - static, "80": 80 - static}
    )


def test_the_sd35_medium_plan_has_the_public_sd35_medium_sizes(tmp_path, monkeypatch):
    result = plan_only("sd35_medium", tmp_path, monkeypatch)
    rows = {c["name"]: c for c in result["memory_plans"]["controlnet"]["components"]}
    teacher = rows["teacher transformer + ControlNet"]
    controlnet = rows["student (trained)"]["trainable_m"]  # 12 of the transformer's 24 blocks, copied
    assert teacher["params_m"] + teacher["buffers_m"] == pytest.approx(
        SD35_TRANSFORMER + controlnet + SD3_POS_EMBED, abs=0.1
    )
    assert teacher["buffers_m"] == pytest.approx(2 * SD3_POS_EMBED, abs=0.1)
    assert controlnet == pytest.approx(1261.169664, abs=0.1)
    assert rows["VAE"]["params_m"] == pytest.approx(SD3_VAE, abs=0.1)
    assert rows["text encoder"]["params_m"] == pytest.approx(SD3_TEXT, abs=0.1)


# FLUX.1-dev: the transformer (19 double- and 38 single-stream blocks), FLUX's VAE (no quant convs), CLIP-L's
# text tower and T5-XXL's encoder, as in the public checkpoint's safetensors.
FLUX_TRANSFORMER, FLUX_VAE, FLUX_TEXT = 11901.408320, 83.819683, 123.060480 + 4762.310656


def test_the_flux_dev_plan_has_the_public_flux_dev_sizes_and_lora_keeps_one_base(tmp_path, monkeypatch):
    result = plan_only("flux_dev", tmp_path, monkeypatch, trainable="controlnet,lora")
    full = {c["name"]: c for c in result["memory_plans"]["controlnet"]["components"]}
    controlnet = full["student (trained)"]["trainable_m"]  # 4 double- and 10 single-stream blocks, copied
    assert full["teacher transformer + ControlNet"]["params_m"] == pytest.approx(
        FLUX_TRANSFORMER + controlnet, abs=0.1
    )
    assert full["VAE"]["params_m"] == pytest.approx(FLUX_VAE, abs=0.1)
    assert full["text encoder"]["params_m"] == pytest.approx(FLUX_TEXT, abs=0.1)
    lora = {c["name"]: c for c in result["memory_plans"]["lora"]["components"]}
    # LoRA: the student's base weights are the teacher's, so the 12 B exist once
    assert lora["student (frozen, own)"]["params_m"] == 0
    assert 0 < lora["student (trained)"]["trainable_m"] < 0.01 * FLUX_TRANSFORMER
    assert result["memory_plans"]["lora"]["device_gib"] < result["memory_plans"]["controlnet"]["device_gib"]
