"""Checkpoints that hold only what training changes; frozen parts reload from their folders."""

from __future__ import annotations


class TrainedStateCheckpoint:
    """LightningModule hooks: keep `trained_state_keys()` (and the micro-step) in checkpoints, and refuse
    a checkpoint whose keys differ, naming what is missing and what is unexpected.

    The module defines `trained_state_keys()`, sets `strict_loading = False` (the frozen keys are absent
    on purpose) and keeps its micro-step counter in `micro_step`.
    """

    MICRO_STEP_KEY = "micro_step"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[self.MICRO_STEP_KEY] = self.micro_step

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
