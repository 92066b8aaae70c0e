"""Logging helpers shared by the training and evaluation entry points."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image


def save_image_grid(module, columns: list[Tensor], name: str, max_rows: int = 4) -> Path | None:
    """Save columns of [B, 3, H, W] images in [0, 1] as one grid under `<log dir>/samples/`.

    The grid also goes to wandb when the module logs there. Only rank 0 writes, and no rank makes a
    collective call here (`trainer.log_dir` broadcasts), so ranks may leave at different points.
    """
    trainer = module.trainer
    if trainer is None or trainer.global_rank != 0:
        return None
    rows = min(max_rows, columns[0].shape[0])
    tiles = torch.stack([c[:rows].detach().float().cpu() for c in columns], dim=1).flatten(0, 1)
    grid = make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)
    root = Path(local_log_dir(trainer)) / "samples"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name.replace('/', '_')}.png"
    save_image(grid, path)
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=name.split("_iter")[0], images=[str(path)], step=trainer.global_step)
    return path


def local_log_dir(trainer) -> str:
    """`trainer.log_dir` without its broadcast: the first logger's folder, else the root dir."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if log_dir:
            return str(log_dir)
    return str(trainer.default_root_dir)


def logging_step(trainer) -> bool:
    """Whether Lightning writes the logs at this step (`trainer.log_every_n_steps`)."""
    return trainer._logger_connector.should_update_logs


def log_where_computed(module, metrics: dict[str, Tensor]) -> None:
    """Log metrics that exist only at some iterations (per-step losses) straight to the loggers.

    `LightningModule.log` would repeat a metric's last value at every later step of the epoch;
    these are written only when given, at the steps Lightning writes its own (`log_every_n_steps`).
    """
    trainer = module._trainer
    if not metrics or trainer is None or not trainer.loggers:
        return
    if not logging_step(trainer):
        return
    values = {k: float(v.detach()) for k, v in metrics.items()}
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
