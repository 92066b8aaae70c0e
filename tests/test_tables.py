"""Paper-shaped tables, the perception-distortion plot and timing summaries from synthetic records."""

import csv

import pytest
import torch
from PIL import Image

from addsr_pl.evaluation.tables import (
    ImageRecord,
    TimingRecord,
    image_records,
    markdown_table,
    plot_perception_distortion,
    read_records_csv,
    summarize,
    timing_summary,
    write_records_csv,
    write_tables,
    write_timing_table,
)


def _records():
    records = []
    for dataset in ("RealSR", "DRealSR"):
        for image, offset in (("a.png", 0.0), ("b.png", 1.0)):
            for steps, psnr, clipiqa, lpips in ((1, 24.0, 0.55, 0.30), (4, 21.0, 0.70, 0.34)):
                metrics = {"psnr": psnr + offset, "clipiqa": clipiqa, "lpips": lpips}
                if steps == 1:
                    metrics["ssim"] = 0.6
                records.append(ImageRecord("AddSR", dataset, image, steps, metrics))
            records.append(ImageRecord("SeeSR", dataset, image, 50, {"psnr": 25.0 + offset, "clipiqa": 0.67}))
            records.append(ImageRecord("Real-ESRGAN", dataset, image, None, {"psnr": 26.0, "lpips": 0.25}))
    return records


def test_summary_means_and_orders():
    summary = summarize(_records(), method_order=["SeeSR"])
    assert summary.labels == ["SeeSR-50", "AddSR-1", "AddSR-4", "Real-ESRGAN"]
    assert summary.datasets == ["RealSR", "DRealSR"]
    assert summary.metrics == ["clipiqa", "lpips", "psnr", "ssim"]  # the paper's order
    assert summary.means[("RealSR", "AddSR-1", "psnr")] == pytest.approx(24.5)
    assert summary.counts[("RealSR", "AddSR-4", "psnr")] == 2


def test_markdown_table_shape_arrows_and_best(tmp_path):
    paths = write_tables(_records(), tmp_path)
    assert all(path.is_file() for path in paths.values())
    lines = paths["markdown"].read_text(encoding="utf-8").splitlines()
    assert lines[0] == "| Dataset | Metric | AddSR-1 | AddSR-4 | SeeSR-50 | Real-ESRGAN |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 2 * 4  # two datasets x four metrics
    assert [row[0] for row in rows] == ["RealSR", "", "", "", "DRealSR", "", "", ""]
    assert [row[1] for row in rows[:4]] == ["CLIPIQA ↑", "LPIPS ↓", "PSNR ↑", "SSIM ↑"]
    clipiqa, lpips, psnr = rows[0], rows[1], rows[2]
    assert clipiqa[3] == "**0.7000**" and clipiqa[5] == "–"
    assert lpips[5] == "**0.2500**"  # lower is better
    assert psnr[5] == "**26.00**" and psnr[2] == "24.50"
    assert rows[3][2] == "0.6000" and rows[3][3] == "–"  # a single value in a row is not "best"


def test_csv_tables_and_record_round_trip(tmp_path):
    records = _records()
    paths = write_tables(records, tmp_path, stem="div2k")
    with paths["csv"].open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["dataset"], r["metric"]) for r in rows[:4]] == [
        ("RealSR", "clipiqa"),
        ("RealSR", "lpips"),
        ("RealSR", "psnr"),
        ("RealSR", "ssim"),
    ]
    assert float(rows[2]["AddSR-4"]) == pytest.approx(21.5) and rows[1]["lower_is_better"] == "True"
    assert read_records_csv(paths["per_image"]) == records
    write_records_csv(records[:3], tmp_path / "part.csv")
    merged = read_records_csv(tmp_path / "part.csv") + records[3:]
    assert markdown_table(summarize(merged)) == markdown_table(summarize(records))


def test_image_records_from_batched_scores():
    scores = {"psnr": torch.tensor([20.0, 30.0]), "musiq": torch.tensor([50.0, 60.0])}
    records = image_records("AddSR", "RealSR", ["a.png", "b.png"], 4, scores)
    assert records[1] == ImageRecord("AddSR", "RealSR", "b.png", 4, {"psnr": 30.0, "musiq": 60.0})
    with pytest.raises(ValueError, match="3 images"):
        image_records("AddSR", "RealSR", ["a", "b", "c"], 4, scores)


def test_perception_distortion_plot(tmp_path):
    path = plot_perception_distortion(_records(), tmp_path / "pd.png", datasets=["RealSR"])
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100
    with pytest.raises(ValueError, match="No records"):
        plot_perception_distortion(_records(), tmp_path / "none.png", datasets=["Nowhere"])


def test_timing_summary_excludes_warmup(tmp_path):
    times = [900.0, 100.0, 120.0, 110.0]
    records = [TimingRecord("AddSR", 4, f"{i}.png", ms) for i, ms in enumerate(times)]
    (row,) = timing_summary(records, warmup=1)
    assert row == {"method": "AddSR-4", "images": 3, "mean_ms": pytest.approx(110.0), "median_ms": 110.0}
    paths = write_timing_table(records, tmp_path, warmup=1)
    assert "| AddSR-4 | 3 | 110.0 | 110.0 |" in paths["markdown"].read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="warm-up"):
        timing_summary(records, warmup=4)
