"""`make demo`'s job: the whole chain on tiny models, and a report with every section."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from addsr_pl.demo import (
    REPORT_SECTIONS,
    TEACHER_MANIFEST,
    ablation_table,
    headline,
    read_log,
    teacher_checkpoint,
    teacher_recipe,
    teacher_training,
    verdict,
)
from addsr_pl.paths import PROJECT_ROOT, config_dir


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["committed", "trained here"])
def test_the_demo_writes_the_report_with_all_its_sections(tmp_path, teacher):
    out = tmp_path / "demo"
    trained_here = ["teacher.checkpoint=null", "teacher.max_steps=60"] if teacher == "trained here" else []
    done = subprocess.run(
        # the real chain at a fraction of `make demo`'s lengths (this checks the report, not the numbers)
        [
            sys.executable,
            "-m",
            "addsr_pl.demo",
            f"output_dir={out}",
            "student.max_steps=4",
            "evaluation.teacher_steps=5",
            *trained_here,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if teacher == "committed":  # `make demo` again into the same folder: every stage trains afresh
        again = subprocess.run(done.args, capture_output=True, text=True, timeout=1500)
        assert again.returncode == 0, again.stderr[-3000:]
        iterations = [
            int(float(r["train/iteration"])) for r in read_log(out / "student") if r.get("train/iteration")
        ]
        assert (
            iterations and len(iterations) == len(set(iterations)) and max(iterations) <= 4
        )  # one run's log
    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for title in REPORT_SECTIONS:
        assert f"## {title}" in markdown and f"<h2>{title}</h2>" in html.replace("&#x27;", "'"), title
    assert "tiny models" in markdown
    for figure in ("losses.png", "ta_schedule.png", "grid_page1000.png"):
        assert (out / "figures" / figure).is_file()
    assert (out / "evaluation" / "perception_distortion.png").is_file()
    assert (
        "AddSR-1" in markdown and "AddSR-4" in markdown and "Bicubic" in markdown and "Teacher-" in markdown
    )


def test_an_ablation_whose_cells_all_agree_says_it_cannot_tell_them_apart():
    full = {"psnr": 11.2220, "ssim": 0.22}
    same = {"psr_off": {"overrides": ["method.psr=false"], "psnr": 11.2221, "ssim": 0.22}}
    apart = {"psr_off": {"overrides": ["method.psr=false"], "psnr": 12.5, "ssim": 0.3}}
    assert "cannot tell the settings apart" in ablation_table(full, same, 0.05)
    assert "cannot tell" not in ablation_table(full, apart, 0.05)
    assert "| psr_off | method.psr=false | 12.50 | 0.3000 |" in ablation_table(full, apart, 0.05)


def test_the_headline_judges_each_check_from_the_numbers():
    summary = {
        "bicubic": {"psnr": 28.0},
        "teacher": {"psnr": 29.0, "ms": 500.0},
        "student": {"1": {"psnr": 28.5, "ms": 25.0}, "2": {"psnr": 27.0, "ms": 45.0}},
    }
    lines = headline(summary).splitlines()
    assert lines[0].startswith("- Teacher beats bicubic on PSNR: yes (29.00 vs 28.00")
    assert lines[1].startswith("- 1-step student beats bicubic on PSNR: yes (28.50")
    assert lines[2] == (
        "- Student within 1 dB of the teacher (29.00 dB) at every step count: NO (1: 28.50 dB yes, 2: 27.00 dB NO)"
    )
    assert lines[3] == (
        "- Student at least 10x faster than the teacher per image at every step count: yes (1: 20.0x yes, 2: 11.1x yes)"
    )
    summary["student"]["2"]["psnr"] = 28.0
    summary["student"]["1"]["ms"] = 100.0
    lines = headline(summary).splitlines()
    assert lines[2].startswith("- Student within 1 dB of the teacher (29.00 dB) at every step count: yes")
    assert lines[3].endswith("NO (1: 5.0x NO, 2: 11.1x yes)")


def test_the_committed_teacher_was_made_with_the_demo_s_settings():
    settings = OmegaConf.load(config_dir() / "demo.yaml")
    folder = teacher_checkpoint(settings)
    assert folder == PROJECT_ROOT / settings.teacher.checkpoint
    for part in ("vae/config.json", "unet/config.json", "controlnet/config.json", "teacher_log.csv"):
        assert (folder / part).is_file(), part
    # small enough to commit
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 20 * 2**20


def test_a_committed_teacher_made_otherwise_or_missing_is_refused_with_the_fix(tmp_path):
    import json

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
