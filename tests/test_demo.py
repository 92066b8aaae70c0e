"""`make demo`'s job: the whole chain on tiny models, and a report with every section."""

import subprocess
import sys

import pytest

from addsr_pl.demo import REPORT_SECTIONS, ablation_table, headline


@pytest.mark.slow
def test_the_demo_writes_the_report_with_all_its_sections(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "addsr_pl.demo", f"output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for title in REPORT_SECTIONS:
        assert f"## {title}" in markdown and f"<h2>{title}</h2>" in html.replace("&#x27;", "'"), title
    assert "tiny models" in markdown
    for figure in ("losses.png", "ta_schedule.png", "grid_chelsea.png"):
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
    assert lines[2] == "- Best student (1 step) within 1 dB of the teacher: yes (28.50 vs 29.00 dB)"
    assert lines[3] == "- 1-step student at least 10x faster than the teacher per image: yes (20.0x)"
    summary["student"]["1"]["ms"] = 100.0
    assert headline(summary).splitlines()[3].endswith("NO (5.0x)")
