"""`make demo`'s job: the whole chain on tiny models, and a report with every section."""

import subprocess
import sys

import pytest

from addsr_pl.demo import REPORT_SECTIONS


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
