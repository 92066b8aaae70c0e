"""Logging helpers shared by the training and evaluation entry points."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image


def save_image_grid(module, columns: list[Tensor], name: str, max_rows: int = 4) -> Path | None:
    """Save columns of [B, 3, H, W] images in [0, 1] as one grid under `<log dir>/samples/`.

    The grid also goes to wandb when the module logs there. Only rank 0 writes.
    """
    trainer = module.trainer
    if trainer is None or trainer.global_rank != 0:
        return None
    rows = min(max_rows, columns[0].shape[0])
    tiles = torch.stack([c[:rows].detach().float().cpu() for c in columns], dim=1).flatten(0, 1)
    grid = make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)
    root = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name.replace('/', '_')}.png"
    save_image(grid, path)
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=name.split("_iter")[0], images=[str(path)], step=trainer.global_step)
    return path
