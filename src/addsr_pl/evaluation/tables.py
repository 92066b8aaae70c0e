"""Result tables shaped like the paper's Tables 2 and 3, the perception-distortion plot of Fig. 5a and
per-image timings.

Input is one `ImageRecord` per (method, step count, dataset, image) with its metric values; records
of separately evaluated methods can be saved with `write_records_csv` and merged later with
`read_records_csv`. Tables have one block per dataset (or degradation case), one row per metric with
its direction (↑ higher is better, ↓ lower is better) and one column per method, labelled like the
paper ("AddSR-4" for 4 steps); the best value of each row is bold in markdown.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from addsr_pl.evaluation.metrics import METRICS

# Row order of the paper's tables (no-reference metrics first), then anything else alphabetically.
PAPER_METRIC_ORDER = ("maniqa", "musiq", "clipiqa", "niqe", "lpips", "dists", "psnr", "ssim")
# Decimals as the paper prints them; other metrics get four.
_DECIMALS = {"psnr": 2, "musiq": 2, "niqe": 2}


@dataclass(frozen=True)
class ImageRecord:
    """Metric values of one output image. `steps` is the student step count (None for methods
    without one, e.g. GAN baselines)."""

    method: str
    dataset: str
    image: str
    steps: int | None
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class TimingRecord:
    """Wall time of one image, in the order the images were run (the first ones are warm-up)."""

    method: str
    steps: int | None
    image: str
    milliseconds: float


def image_records(
    method: str,
    dataset: str,
    images: Sequence[str],
    steps: int | None,
    scores: Mapping[str, Sequence[float]],
) -> list[ImageRecord]:
    """One record per image from a batch of scores (`MetricSuite`'s {name: Tensor[B]})."""
    for name, values in scores.items():
        if len(values) != len(images):
            raise ValueError(f"{len(values)} {name} scores for {len(images)} images")
    return [
        ImageRecord(
            method, dataset, image, steps, {name: float(values[i]) for name, values in scores.items()}
        )
        for i, image in enumerate(images)
    ]


def method_label(method: str, steps: int | None) -> str:
    """The paper's column label: "AddSR-4" for 4 steps, the bare name without a step count."""
    return method if steps is None else f"{method}-{steps}"


def metric_label(name: str, lower_is_better: Mapping[str, bool] | None = None) -> str:
    """ "PSNR ↑", "LPIPS ↓"; metrics outside the suite keep their name and get an arrow if known."""
    label = METRICS[name].label if name in METRICS else name
    lower = _lower_is_better(name, lower_is_better)
    return label if lower is None else f"{label} {'↓' if lower else '↑'}"


def _lower_is_better(name: str, overrides: Mapping[str, bool] | None) -> bool | None:
    if overrides is not None and name in overrides:
        return overrides[name]
    return METRICS[name].lower_is_better if name in METRICS else None


@dataclass(frozen=True)
class Summary:
    """Mean (and count) of every metric per dataset and column label, with the orders to print them."""

    datasets: list[str]
    columns: list[tuple[str, int | None]]  # (method, steps)
    labels: list[str]  # method_label of each column
    metrics: list[str]
    means: dict[tuple[str, str, str], float]  # (dataset, label, metric) -> mean
    counts: dict[tuple[str, str, str], int]


def summarize(
    records: Iterable[ImageRecord],
    metric_order: Sequence[str] | None = None,
    method_order: Sequence[str] | None = None,
) -> Summary:
    """Average the records per dataset, method-with-steps and metric.

    Columns follow `method_order` (then first appearance), step counts ascending within a method;
    rows follow `metric_order` or else the paper's order; datasets keep their first appearance.
    """
    records = list(records)
    if not records:
        raise ValueError("No metric records to tabulate")
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    datasets: list[str] = []
    methods: dict[str, set] = {}
    names: set[str] = set()
    for record in records:
        if record.dataset not in datasets:
            datasets.append(record.dataset)
        methods.setdefault(record.method, set()).add(record.steps)
        label = method_label(record.method, record.steps)
        for name, value in record.metrics.items():
            names.add(name)
            values[(record.dataset, label, name)].append(float(value))
    ordered_methods = [m for m in (method_order or []) if m in methods]
    ordered_methods += [m for m in methods if m not in ordered_methods]
    columns = [
        (method, steps)
        for method in ordered_methods
        for steps in sorted(methods[method], key=lambda s: -1 if s is None else s)
    ]
    labels = [method_label(method, steps) for method, steps in columns]
    order = list(metric_order) if metric_order is not None else list(PAPER_METRIC_ORDER)
    metric_rows = [m for m in order if m in names] + sorted(names - set(order))
    means = {key: statistics.fmean(v) for key, v in values.items()}
    counts = {key: len(v) for key, v in values.items()}
    return Summary(datasets, columns, labels, metric_rows, means, counts)


def _format(name: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.{_DECIMALS.get(name, 4)}f}"


def _best(summary: Summary, dataset: str, name: str, lower: bool | None) -> set[str]:
    """Labels holding the best (as printed) value of a row; none when the direction is unknown."""
    if lower is None:
        return set()
    printed = {
        label: float(_format(name, summary.means[(dataset, label, name)]))
        for label in summary.labels
        if (dataset, label, name) in summary.means
    }
    if len(printed) < 2:
        return set()
    target = min(printed.values()) if lower else max(printed.values())
    return {label for label, value in printed.items() if value == target}


def markdown_table(summary: Summary, lower_is_better: Mapping[str, bool] | None = None) -> str:
    """The paper-shaped table: Dataset | Metric | one column per method; best of each row in bold."""
    lines = [
        "| " + " | ".join(["Dataset", "Metric", *summary.labels]) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * len(summary.labels)) + "|",
    ]
    for dataset in summary.datasets:
        first = True
        for name in summary.metrics:
            if not any((dataset, label, name) in summary.means for label in summary.labels):
                continue
            best = _best(summary, dataset, name, _lower_is_better(name, lower_is_better))
            cells = []
            for label in summary.labels:
                text = _format(name, summary.means.get((dataset, label, name)))
                cells.append(f"**{text}**" if label in best else text)
            lines.append(
                "| "
                + " | ".join([dataset if first else "", metric_label(name, lower_is_better), *cells])
                + " |"
            )
            first = False
    return "\n".join(lines) + "\n"


def write_tables(
    records: Iterable[ImageRecord],
    out_dir: str | Path,
    *,
    metric_order: Sequence[str] | None = None,
    method_order: Sequence[str] | None = None,
    lower_is_better: Mapping[str, bool] | None = None,
    stem: str = "results",
) -> dict[str, Path]:
    """Write `<stem>.md` (paper-shaped), `<stem>.csv` (the same numbers at full precision, one row per
    dataset and metric) and `<stem>_per_image.csv`; returns {"markdown", "csv", "per_image"} -> path."""
    records = list(records)
    summary = summarize(records, metric_order, method_order)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / f"{stem}.md",
        "csv": out_dir / f"{stem}.csv",
        "per_image": out_dir / f"{stem}_per_image.csv",
    }
    paths["markdown"].write_text(markdown_table(summary, lower_is_better), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "metric", "lower_is_better", *summary.labels, "images"])
        for dataset in summary.datasets:
            for name in summary.metrics:
                keys = [(dataset, label, name) for label in summary.labels]
                if not any(key in summary.means for key in keys):
                    continue
                lower = _lower_is_better(name, lower_is_better)
                means = [repr(summary.means[key]) if key in summary.means else "" for key in keys]
                images = max(summary.counts.get(key, 0) for key in keys)
                writer.writerow([dataset, name, "" if lower is None else lower, *means, images])
    write_records_csv(records, paths["per_image"])
    return paths


def write_records_csv(records: Iterable[ImageRecord], path: str | Path) -> Path:
    """Per-image records as CSV: method, dataset, image, steps, then one column per metric."""
    records = list(records)
    names = sorted({name for record in records for name in record.metrics})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "dataset", "image", "steps", *names])
        for r in records:
            metrics = [repr(float(r.metrics[n])) if n in r.metrics else "" for n in names]
            writer.writerow([r.method, r.dataset, r.image, "" if r.steps is None else r.steps, *metrics])
    return path


def read_records_csv(path: str | Path) -> list[ImageRecord]:
    """Records written by `write_records_csv` (to merge methods evaluated in separate runs)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    fixed = {"method", "dataset", "image", "steps"}
    return [
        ImageRecord(
            row["method"],
            row["dataset"],
            row["image"],
            int(row["steps"]) if row["steps"] else None,
            {k: float(v) for k, v in row.items() if k not in fixed and v != ""},
        )
        for row in rows
    ]


def plot_perception_distortion(
    records: Iterable[ImageRecord],
    path: str | Path,
    *,
    x_metric: str = "psnr",
    y_metric: str = "clipiqa",
    datasets: Sequence[str] | None = None,
) -> Path:
    """Fig. 5a: per method, the mean of `x_metric` (fidelity) against `y_metric` (perception) at each
    student step count, connected in step order and annotated with the count; one panel per dataset."""
    summary = summarize(records)
    panels = [d for d in (datasets or summary.datasets) if d in summary.datasets]
    if not panels:
        raise ValueError(f"No records for datasets {list(datasets or [])}")
    figure = Figure(figsize=(4.5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    curves = _curves(summary, x_metric, y_metric)
    for axis, dataset in zip(axes, panels):
        for method, points in curves[dataset].items():
            xs, ys, _ = zip(*points)
            axis.plot(xs, ys, marker="o", label=method)
            for x, y, count in points:
                axis.annotate(f"{count}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_title(dataset)
        axis.set_xlabel(metric_label(x_metric))
        axis.set_ylabel(metric_label(y_metric))
        axis.grid(alpha=0.3)
        if curves[dataset]:
            axis.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    return path


def _curves(
    summary: Summary, x_metric: str, y_metric: str
) -> dict[str, dict[str, list[tuple[float, float, int]]]]:
    """dataset -> method -> [(x mean, y mean, steps)] in step order, for methods with a step count."""
    curves: dict[str, dict[str, list]] = {dataset: defaultdict(list) for dataset in summary.datasets}
    for dataset in summary.datasets:
        for (method, steps), label in zip(summary.columns, summary.labels):
            x, y = (
                summary.means.get((dataset, label, x_metric)),
                summary.means.get((dataset, label, y_metric)),
            )
            if steps is not None and x is not None and y is not None:
                curves[dataset][method].append((x, y, steps))
    return curves


def timing_summary(records: Iterable[TimingRecord], warmup: int) -> list[dict]:
    """Per method and step count: images timed, mean and median milliseconds, without the first
    `warmup` images of each (CUDA kernels, cuDNN autotuning and caches warm up on them)."""
    groups: dict[tuple[str, int | None], list[float]] = defaultdict(list)
    for record in records:
        groups[(record.method, record.steps)].append(record.milliseconds)
    rows = []
    for (method, steps), times in groups.items():
        kept = times[warmup:]
        if not kept:
            raise ValueError(
                f"{method_label(method, steps)} has {len(times)} timed images, all inside the warm-up of "
                f"{warmup}; time more images or lower the warm-up"
            )
        rows.append(
            {
                "method": method_label(method, steps),
                "images": len(kept),
                "mean_ms": statistics.fmean(kept),
                "median_ms": statistics.median(kept),
            }
        )
    return rows


def write_timing_table(
    records: Iterable[TimingRecord], out_dir: str | Path, *, warmup: int, stem: str = "timing"
) -> dict[str, Path]:
    """`<stem>.csv` and `<stem>.md` from `timing_summary`; returns {"csv", "markdown"} -> path."""
    rows = timing_summary(records, warmup)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "markdown": out_dir / f"{stem}.md"}
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "images", "mean_ms", "median_ms"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Per-image time, first {warmup} image(s) of each method excluded as warm-up.",
        "",
        "| Method | Images | Mean (ms) | Median (ms) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['method']} | {r['images']} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} |" for r in rows]
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths
