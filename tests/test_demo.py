"""`make demo`'s job: the whole chain on tiny models, and a report with every section."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from addsr_pl.demo import (
    REPORT_SECTIONS,
    TEACHER_MANIFEST,
    ablation_table,
    checks_text,
    judge,
    last_run,
    read_log,
    teacher_checkpoint,
    teacher_recipe,
    teacher_training,
    verdict,
)
from addsr_pl.paths import PROJECT_ROOT, config_dir

DISTILLATION_OFF = (
    "student.overrides=[method.optimizer_g.lr=1e-12,method.optimizer_d.lr=1e-4,trainer.limit_val_batches=0]"
)


def check_report(out) -> None:
    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for title in REPORT_SECTIONS:
        assert f"## {title}" in markdown and f"<h2>{title}</h2>" in html.replace("&#x27;", "'"), title
    assert "tiny models" in markdown
    assert html.count("<li>") == 4 and "<li>distillation: " in html  # one check per line
    for figure in ("losses.png", "ta_schedule.png", "grid_page1000.png"):
        assert (out / "figures" / figure).is_file()
    assert (out / "evaluation" / "perception_distortion.png").is_file()
    assert all(
        f"| {m} |" in markdown
        for m in ("Bicubic", "Teacher-1", "Teacher-4", "Teacher-5", "AddSR-1", "AddSR-4")
    )


@pytest.mark.slow
def test_the_demo_writes_the_report_with_all_its_sections(tmp_path):
    """`make demo` twice into one folder: first with a teacher trained inside the demo, then with the
    committed teacher and distillation switched off (the noise floor and the ablation run there)."""
    out = tmp_path / "demo"
    # the real chain at a fraction of `make demo`'s lengths (this checks the report, not the numbers)
    short = ["student.max_steps=4", "evaluation.teacher_steps=5", "evaluation.dataset.seeds=[1000,1001]",
             "headline.classifier.steps=30"]  # fmt: skip
    command = [sys.executable, "-m", "addsr_pl.demo", f"output_dir={out}", *short]
    trained_here = [
        "teacher.checkpoint=null",
        "teacher.max_steps=20",
        "ablation.cells=null",
        "noise_floor.seeds=[]",
    ]
    done = subprocess.run([*command, *trained_here], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    check_report(out)
    # `make demo` again into the same folder, on the committed teacher, with distillation switched off:
    # every stage trains afresh, and the distillation check fails (the student is its teacher, no better
    # at the same steps)
    again = subprocess.run(
        [*command, "noise_floor.seeds=[43]", DISTILLATION_OFF], capture_output=True, text=True, timeout=1500
    )
    assert again.returncode == 0, again.stderr[-3000:]
    iterations = [
        int(float(r["train/iteration"])) for r in read_log(out / "student") if r.get("train/iteration")
    ]
    assert iterations and len(iterations) == len(set(iterations)) and max(iterations) <= 4  # one run's log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checks"]["distillation"]["passed"] is False
    assert set(metrics["checks"]) == {"distillation", "near_many_step_teacher", "beats_bicubic", "faster"}
    assert set(metrics["teacher_steps"]) == set(metrics["student"]) == {"1", "2", "3", "4"}
    rows = [
        metrics["bicubic"],
        metrics["teacher"],
        *metrics["teacher_steps"].values(),
        *metrics["student"].values(),
    ]
    assert metrics["headline"] == "readability" and all(0 <= r["readability"] <= 1 for r in rows)
    assert set(metrics["noise_floor"]) == {"1", "2", "3", "4"}
    assert set(metrics["ablation"]) == {"psr_off", "ta_off", "teacher_lr"}
    check_report(out)


def test_the_ablation_sets_each_cell_against_the_noise_floor():
    full = {"psnr": 11.2220, "ssim": 0.22, "readability": 0.50}
    cells = {"psr_off": {"overrides": ["method.psr=false"], "psnr": 11.3, "ssim": 0.22, "readability": 0.52},
             "ta_off": {"overrides": ["method.ta_schedule=none"], "psnr": 12.5, "ssim": 0.3, "readability": 0.41}}  # fmt: skip
    table = ablation_table(full, cells, "readability", 0.03)
    assert "| psr_off | method.psr=false | 11.30 | 0.2200 | 0.520 | +0.020 | no |" in table
    assert "| ta_off | method.ta_schedule=none | 12.50 | 0.3000 | 0.410 | -0.090 | yes |" in table
    assert "Beyond the noise floor: ta_off." in table and "Within it" in table and "psr_off." in table
    assert "yes |" not in ablation_table(full, cells, "readability", 0.1)


def summary_with(student: dict, few: dict, floor: dict) -> dict:
    return {
        "bicubic": {"readability": 0.3},
        "teacher": {"readability": 0.6, "ms": 1000.0, "steps": 50},
        "teacher_steps": {k: {"readability": v, "ms": 30.0 * int(k)} for k, v in few.items()},
        "student": {k: {"readability": v, "ms": 30.0 * int(k)} for k, v in student.items()},
        "headline": "readability",
        "noise_floor": floor,
    }


def test_the_distillation_check_fails_a_student_no_better_than_its_teacher_at_the_same_steps():
    checks = OmegaConf.create({"near_tolerance": 0.05, "min_speedup": 10})
    few = {"1": 0.40, "2": 0.45}
    distilled = judge(summary_with({"1": 0.58, "2": 0.59}, few, {"1": 0.02, "2": 0.02}), checks)
    assert {name: c["passed"] for name, c in distilled.items()} == {
        "distillation": True, "near_many_step_teacher": True, "beats_bicubic": True, "faster": True}  # fmt: skip
    # the teacher's own weights (distillation switched off): no better than the teacher at the same steps
    off = judge(summary_with({"1": 0.40, "2": 0.46}, few, {"1": 0.02, "2": 0.02}), checks)
    assert not off["distillation"]["passed"] and not off["near_many_step_teacher"]["passed"]
    # better, but not beyond the noise floor at every step count
    noisy = judge(summary_with({"1": 0.58, "2": 0.49}, few, {"1": 0.02, "2": 0.05}), checks)
    assert not noisy["distillation"]["passed"]
    assert noisy["distillation"]["margin"]["2"] == pytest.approx(0.04)
    # a margin of as many glyphs as the floor is a tie, whichever way float32 rounding tips it
    nine_of_421 = float(torch.tensor(9.0) / 421)
    tied = judge(summary_with({"1": 0.40 + nine_of_421 + 1e-8}, {"1": 0.40}, {"1": nine_of_421}), checks)
    assert not tied["distillation"]["passed"]
    lines = checks_text(noisy).splitlines()
    assert len(lines) == 4 and lines[0].startswith("- distillation: NO: the student beats the teacher")
    assert "margin {1: 0.180, 2: 0.040}; noise_floor {1: 0.020, 2: 0.050}" in lines[0]
    slow = summary_with({"1": 0.58, "2": 0.59}, few, {})
    slow["student"]["2"]["ms"] = 500.0
    assert not judge(slow, checks)["faster"]["passed"]


def test_the_loss_plot_reads_one_run_of_a_log_that_holds_two(tmp_path):
    rows = [{"train/iteration": str(i), "train/loss": "1"} for i in (0, 40, 80)]
    rows += [{"train/iteration": "", "train/loss": ""}]
    rows += [{"train/iteration": str(i), "train/loss": "0.5"} for i in (0, 40)]
    assert last_run(rows) == rows[4:]
    assert last_run(rows[:3]) == rows[:3]
    (tmp_path / "teacher_log.csv").write_text("train/iteration,train/loss\n0,1\n40,1\n0,0.5\n40,0.4\n")
    assert [r["train/loss"] for r in read_log(tmp_path)] == ["0.5", "0.4"]


def test_the_committed_teacher_was_made_with_the_demo_s_settings():
    settings = OmegaConf.load(config_dir() / "demo.yaml")
    folder = teacher_checkpoint(settings)
    assert folder == PROJECT_ROOT / settings.teacher.checkpoint
    for part in ("vae/config.json", "unet/config.json", "controlnet/config.json", "teacher_log.csv"):
        assert (folder / part).is_file(), part
    # small enough to commit
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 20 * 2**20


def test_a_committed_teacher_made_otherwise_or_missing_is_refused_with_the_fix(tmp_path):
    settings = OmegaConf.load(config_dir() / "demo.yaml")
    settings.teacher.checkpoint = str(tmp_path)
    with pytest.raises(SystemExit, match="no demo_teacher.json.*make demo-teacher.*teacher.checkpoint=null"):
        teacher_checkpoint(settings)
    recipe = {"seed": 1, "data": "sample", "crop_size": settings.crop_size,
              "model_overrides": list(settings.model_overrides)}  # fmt: skip
    made = {"recipe": recipe, **teacher_training(settings)}
    (tmp_path / TEACHER_MANIFEST).write_text(json.dumps(made))
    with pytest.raises(
        SystemExit, match=r"other settings \(seed, data: seed=1, data='sample'\).*make demo-teacher"
    ):
        teacher_checkpoint(settings)
    # trained otherwise (here: without the HR-blended controls) is refused as well
    made["recipe"] = teacher_recipe(settings)
    (tmp_path / TEACHER_MANIFEST).write_text(json.dumps(made))
    assert teacher_checkpoint(settings) == tmp_path
    made["overrides"] = [o for o in made["overrides"] if "control_hr_blend" not in o]
    (tmp_path / TEACHER_MANIFEST).write_text(json.dumps(made))
    with pytest.raises(SystemExit, match=r"other settings \(overrides: overrides=\[.*make demo-teacher"):
        teacher_checkpoint(settings)


def test_the_verdict_names_the_codec_and_the_step_counts_behind_the_teacher():
    means = {"Bicubic": {"psnr": 17.0}, "Teacher-50": {"psnr": 20.0}, "AddSR-1": {"psnr": 20.5},
             "AddSR-2": {"psnr": 18.5}, "AddSR-4": {"psnr": 16.0}}  # fmt: skip
    text = verdict(means, float("inf"), "Teacher-50")
    assert text.startswith("Yes: AddSR-1 reaches 20.50 dB against bicubic's 17.00 dB")
    assert "At 2, 4 steps the student is more than 1 dB under the teacher" in text and "lossless" in text
    text = verdict({**means, "AddSR-2": {"psnr": 19.5}, "AddSR-4": {"psnr": 19.2}}, 16.6, "Teacher-50")
    assert "more than 1 dB" not in text and "reaches 16.60 dB" in text
