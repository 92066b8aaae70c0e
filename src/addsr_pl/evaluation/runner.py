"""The evaluation protocol: every method over every set, scored by one MetricSuite, written as tables."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from addsr_pl.config import check_schema
from addsr_pl.core.sampler import upscale
from addsr_pl.evaluation.metrics import MetricSuite
from addsr_pl.evaluation.tables import (
    ImageRecord,
    TimingRecord,
    image_records,
    plot_perception_distortion,
    write_tables,
    write_timing_table,
)
from addsr_pl.inference.io import IMAGE_EXTENSIONS, read_image, write_image
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.paths import config_dir
from addsr_pl.upscale import resolve_device

log = logging.getLogger(__name__)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_output(folder: Path, dataset: str, name: str) -> Path:
    """A baseline's output for one image: <folder>/<dataset>/<name>.<image extension>."""
    for extension in IMAGE_EXTENSIONS:
        path = folder / dataset / f"{name}{extension}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"No output for {dataset}/{name} under {folder / dataset} (any of {IMAGE_EXTENSIONS})"
    )


class Evaluation:
    """Runs the configured methods over the configured sets; see `conf/eval.yaml`."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.paths.output_dir)
        self.device = resolve_device(cfg.device)
        self.records: list[ImageRecord] = []
        self.timings: list[TimingRecord] = []
        self.upscaler = None
        if cfg.student:
            settings = OmegaConf.merge(OmegaConf.load(config_dir() / "upscale.yaml"), cfg.upscale)
            settings = OmegaConf.to_container(settings, resolve=True)
            check_schema(settings, "upscale")  # a bad `upscale.*` override fails before any model runs
            if cfg.precision is not None:
                settings["precision"] = cfg.precision
            settings["weights_dir"] = cfg.paths.weights_dir  # the student's weight references
            pipeline = AddSRPipeline.for_inference(cfg.student, settings, self.device)
            if pipeline.scale != int(cfg.scale):
                raise ValueError(
                    f"scale = {cfg.scale}, but the student at {cfg.student} is x{pipeline.scale}"
                )
            self.upscaler = Upscaler(pipeline, settings)
        # after the student: a damaged student folder fails before any metric network is made
        m = cfg.metrics
        self.suite = MetricSuite(m.names, int(cfg.scale), m.weights_dir, self.device, pretrained=m.pretrained)

    def score(
        self, method: str, dataset: str, name: str, steps: int | None, sr: Tensor, hr: Tensor | None
    ) -> None:
        scores = self.suite(sr, hr)
        self.records += image_records(method, dataset, [name], steps, scores)
        if self.cfg.save_images:
            label = method if steps is None else f"{method}-{steps}"
            write_image(self.out_dir / "images" / label / dataset / f"{name}.png", sr[0].float().cpu())

    def run_model(self, dataset: str, name: str, lr: Tensor, hr: Tensor | None) -> None:
        for steps in self.cfg.steps:
            self.upscaler.settings["steps"] = int(steps)
            _synchronize(self.device)
            start = time.perf_counter()
            sr = self.upscaler.upscale_tensor(lr.to(self.device))
            _synchronize(self.device)
            elapsed = (time.perf_counter() - start) * 1000
            self.timings.append(TimingRecord(self.cfg.method_name, int(steps), f"{dataset}/{name}", elapsed))
            self.score(self.cfg.method_name, dataset, name, int(steps), sr, hr)

    def run(self) -> dict[str, Path]:
        for dataset, node in self.cfg.datasets.items():
            for item in instantiate(node):
                lr = item["lr"][None]
                hr = item["hr"][None] if "hr" in item else None
                name = item["name"]
                size = (lr.shape[-2] * int(self.cfg.scale), lr.shape[-1] * int(self.cfg.scale))
                if self.cfg.include_bicubic:
                    self.score("Bicubic", dataset, name, None, upscale(lr, size), hr)
                if self.upscaler is not None:
                    self.run_model(dataset, name, lr, hr)
                for method, folder in self.cfg.baselines.items():
                    sr = read_image(find_output(Path(folder), dataset, name)).rgb[None]
                    self.score(method, dataset, name, None, sr, hr)
        return self.write()

    def pd_axes(self) -> tuple[str, str] | None:
        """The perception-distortion plot's (x, y) metrics: `pd_plot`'s where both are scored, else the
        closest pair among the scored metrics (said in the log); None, with the reason, when fewer than
        two metrics are scored."""
        names = list(self.suite.names)
        want_x, want_y = self.cfg.pd_plot.x_metric, self.cfg.pd_plot.y_metric
        if len(names) < 2:
            log.warning("perception_distortion.png skipped: it needs two metrics, metrics.names=%s", names)
            return None
        reference = self.suite.full_reference
        x = want_x if want_x in names else next((n for n in names if reference[n]), names[0])
        others = [n for n in names if n != x]
        y = want_y if want_y in others else next((n for n in others if not reference[n]), others[0])
        if (x, y) != (want_x, want_y):
            log.warning(
                "perception_distortion.png plots %s against %s: pd_plot asks for %s against %s, and "
                "metrics.names=%s lacks %s",
                y, x, want_y, want_x, names, " and ".join(m for m in (want_x, want_y) if m not in names),
            )  # fmt: skip
        return x, y

    def write(self) -> dict[str, Path]:
        order = ["Bicubic", *self.cfg.baselines, *([self.cfg.method_name] if self.upscaler else [])]
        paths = write_tables(
            self.records,
            self.out_dir,
            metric_order=list(self.cfg.metrics.names),
            method_order=order,
            lower_is_better=self.suite.lower_is_better,
        )
        paths["records"] = paths["per_image"]  # one per-image CSV (results_per_image.csv), not two copies
        axes = self.pd_axes() if self.upscaler is not None else None
        if axes is not None:
            x, y = axes
            paths["pd_plot"] = plot_perception_distortion(
                self.records, self.out_dir / "perception_distortion.png", x_metric=x, y_metric=y
            )
        if self.timings:
            paths |= {f"timing_{k}": v for k, v in write_timing_table(
                self.timings, self.out_dir, warmup=int(self.cfg.timing.warmup)
            ).items()}  # fmt: skip
        for key, path in paths.items():
            log.info("%s: %s", key, path)
        return paths
