"""Checkpoints that hold only what training changes; frozen parts reload from their folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning_fabric.plugins import TorchCheckpointIO


class TrainedStateCheckpoint:
    """LightningModule hooks: keep `trained_state_keys()` (and the micro-step) in checkpoints, and refuse
    a checkpoint whose keys differ, naming what is missing and what is unexpected.

    The module defines `trained_state_keys()`, sets `strict_loading = False` (the frozen keys are absent
    on purpose) and keeps its micro-step counter in `micro_step`.
    """

    MICRO_STEP_KEY = "micro_step"
    NONFINITE_KEY = "nonfinite"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[self.MICRO_STEP_KEY] = self.micro_step
        if getattr(self, "nonfinite", None) is not None:
            checkpoint[self.NONFINITE_KEY] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, expected = set(checkpoint["state_dict"]), self.trained_state_keys()
        if saved != expected:
            missing, extra = sorted(expected - saved), sorted(saved - expected)
            raise RuntimeError(
                f"This checkpoint was written for a different {type(self).__name__} configuration "
                f"(trainable set or model): missing {missing[:5]} ({len(missing)}), "
                f"unexpected {extra[:5]} ({len(extra)})."
            )
        self.micro_step = checkpoint.get(self.MICRO_STEP_KEY, 0)
        if getattr(self, "nonfinite", None) is not None and self.NONFINITE_KEY in checkpoint:
            self.nonfinite.load_state_dict(checkpoint[self.NONFINITE_KEY])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that never leave a truncated file at the target path.

    The checkpoint goes to a temporary file beside the target (same folder, so same filesystem,
    whatever TMPDIR is), is flushed and fsynced, then renamed over the target; the folder is fsynced
    so the rename survives a power cut. A writer killed mid-save leaves the previous file intact and a
    `<name>.tmp-<pid>` that the next save of that name removes. Local paths only; other URLs go
    through Lightning's own writer.
    """

    TEMP_INFIX = ".tmp-"

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{target.name}{self.TEMP_INFIX}*"):
            stale.unlink(missing_ok=True)
        temp = target.with_name(f"{target.name}{self.TEMP_INFIX}{os.getpid()}")
        try:
            with open(temp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
