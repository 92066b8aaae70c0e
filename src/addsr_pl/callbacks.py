"""Training callbacks for long, pre-emptible, multi-process runs (configured in conf/callbacks/)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from pytorch_lightning.callbacks import TQDMProgressBar
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from addsr_pl.logging import logging_step

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """The run was stopped by a pre-emption signal after writing its checkpoint."""


class Preemption(pl.Callback):
    """SIGTERM / SIGUSR1: stop every rank with `exit_code`; during training, after writing `last.ckpt`.

    `install()` sets the handlers when `addsr_pl.train` starts, before any rank is started, and
    `uninstall()` restores the previous ones when it ends; Lightning's own handlers are never set
    (`attach`), since they broadcast inside the handler and end a run signalled before the training
    loop with exit code 0 and no checkpoint.

    * Start-up (before `on_train_start`) and after training: nothing was trained since the last
      checkpoint, so the handler stops at once: it passes the signal on to the ranks this process
      started (Lightning's `ddp` launcher), each of which stops the same way, and raises
      `Preempted(exit_code)`.
    * Training: the handler only records the signal (no collective call can run inside a handler).
      After each training iteration every rank all-reduces what it received, so all ranks see a signal
      sent to any of them at the same iteration; they save one checkpoint at that clean boundary and
      raise `Preempted(exit_code)`, so schedulers and `train && evaluate` chains see the run as unfinished.

    Under SLURM with auto-requeue (Lightning's `SLURMEnvironment`), the requeue signal during training
    also goes through Lightning's requeue routine, which writes its `hpc_ckpt_*.ckpt` and requeues the
    job; `ckpt_path=last` resumes from the checkpoint with the highest iteration.

    Args:
        dirpath: folder of `last.ckpt` (the checkpoint callback's).
        exit_code: the process's exit status after a pre-emption.
        signals: signal names to handle.
        rank_exit_timeout_s: how long the launching process waits for the ranks it started after a
            pre-emption during training (they write the checkpoint together).
        outside_training_exit_timeout_s: the same after a stop outside the training loop, where no rank
            has anything to write: a rank that already entered the loop waits in a collective for the
            launcher, which is waiting for it, so it is killed after this shorter time.
    """

    def __init__(
        self,
        dirpath: str,
        exit_code: int,
        signals: list[str],
        rank_exit_timeout_s: float,
        outside_training_exit_timeout_s: float,
    ):
        self.path = Path(dirpath) / "last.ckpt"
        self.exit_code = exit_code
        self.rank_exit_timeout_s = rank_exit_timeout_s
        self.outside_training_exit_timeout_s = outside_training_exit_timeout_s
        self.signals = [getattr(signal, name) for name in signals]
        self.received = 0
        self.training = False
        self.stopping = False
        self.stopped_outside_training = False
        self.trainer = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("Not in the main thread: pre-emption signals are left to Lightning.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def attach(self, trainer) -> None:
        """Know the trainer (whose launcher holds the started ranks); keep Lightning off these signals."""
        self.trainer = trainer
        if self._previous:
            trainer._signal_connector.register_signal_handlers = lambda: None

    def _handle(self, signum, frame) -> None:
        self.received = int(signum)
        if self.training or self.stopping:
            return  # acted on at the end of the iteration, on every rank together
        self.stopping = self.stopped_outside_training = True
        log.warning("%s received outside the training loop; stopping.", signal.Signals(signum).name)
        for proc in self.started_ranks():
            if proc.poll() is None:
                proc.send_signal(signum)
        raise Preempted(self.exit_code)

    def started_ranks(self) -> list:
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        return list(getattr(launcher, "procs", None) or [])

    def on_train_start(self, trainer, pl_module) -> None:
        self.training = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        accumulate = (getattr(pl_module, "method", None) or {}).get("accumulate_grad_batches", 1)
        if getattr(pl_module, "micro_step", 0) % accumulate:
            return  # inside an accumulated iteration (same on every rank): wait for its end
        if trainer.world_size == 1:
            signum = self.received  # no other rank to agree with: no device round trip
        else:
            received = torch.tensor(float(self.received), device=pl_module.device)
            signum = int(trainer.strategy.reduce(received, reduce_op="max"))
        if not signum:
            return
        name = signal.Signals(signum).name
        log.warning(
            "Rank %d: %s received; writing %s at iteration %d and stopping.",
            trainer.global_rank,
            name,
            self.path,
            int(getattr(pl_module, "iteration", trainer.global_step)),
        )
        trainer.save_checkpoint(self.path)
        environment = trainer._accelerator_connector.cluster_environment
        if (
            isinstance(environment, SLURMEnvironment)
            and environment.auto_requeue
            and signum == environment.requeue_signal
        ):
            trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)
        self.stopping = True
        self.training = False
        raise Preempted(self.exit_code)

    def wait_for_started_ranks(self) -> None:
        """In the launching process: wait for the ranks it started (Lightning's `ddp` launcher) to
        exit, killing those that outlive their timeout, so no rank outlives the job's exit.

        Lightning's child-process observer is stopped first: it SIGKILLs the launcher as soon as a rank
        exits non-zero, which every pre-empted rank does, and the launcher would exit -9 instead."""
        for thread in threading.enumerate():
            if isinstance(thread, _ChildProcessObserver):
                thread._child_processes = []  # nothing left to watch: the observer's next round ends it
        timeout = (
            self.outside_training_exit_timeout_s
            if self.stopped_outside_training
            else self.rank_exit_timeout_s
        )
        deadline = time.monotonic() + timeout
        for proc in self.started_ranks():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("Rank process %d did not exit within %s s; killing it.", proc.pid, timeout)
                proc.kill()
                proc.wait()

    def leave_training(self) -> None:
        """Called once `trainer.fit` has returned (the final checkpoint written): a signal recorded after
        the last iteration's check, or one that comes from now on, stops the run before the export."""
        self.training = False
        if self.received and not self.stopping:
            self._handle(self.received, None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.training = False


class SignalAt(pl.Callback):
    """Fault injection for tests (`fault.signal_at`): global rank 0 sends itself `signum` at a start-up
    point, `setup` (ranks started and connected) or `train_start` (before the pre-emption callback's
    own `on_train_start`)."""

    def __init__(self, when: str, signum: int):
        if when not in ("setup", "train_start"):
            raise ValueError(f"fault.signal_at = {when!r}: must be null, 'setup' or 'train_start'.")
        self.when, self.signum = when, signum

    def _send(self, trainer, when: str) -> None:
        if self.when == when and trainer.global_rank == 0:
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer, pl_module, stage) -> None:
        self._send(trainer, "setup")

    def on_train_start(self, trainer, pl_module) -> None:
        self._send(trainer, "train_start")


class BadFileCount(pl.Callback):
    """Logs `train/bad_files_skipped`: unreadable training files met so far, summed over ranks."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "bad_files"):
            return
        if not logging_step(trainer):
            return  # a running count: written at the logging steps, with no device copy in between
        count = torch.tensor(float(len(datamodule.bad_files)), device=pl_module.device)
        pl_module.log("train/bad_files_skipped", count, batch_size=1, sync_dist=True, reduce_fx="sum")


class FinalCheckpoint(pl.Callback):
    """Writes `last.ckpt` when training ends, so it always holds the state the run stopped at.

    Lightning's `ModelCheckpoint(save_last=True)` skips its end-of-training save once any `last`
    was written earlier in the run (e.g. after a validation), which left `last.ckpt` behind the run.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)


def console_loggers() -> list[logging.Logger]:
    """The root logger and every named logger with handlers of its own (Lightning's, for one)."""
    named = logging.root.manager.loggerDict.values()
    return [logging.root, *(lg for lg in named if isinstance(lg, logging.Logger) and lg.handlers)]


def write_warning_above_bar(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` that prints with `tqdm.write`, above the bars in use."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    tqdm.write(text.rstrip("\n"), file=file or sys.stderr)


class IterationProgressBar(TQDMProgressBar):
    """One bar for the whole run that counts training iterations, with the losses and it/s.

    Lightning's bar counts batches of an epoch (`Epoch 0/-2` for a run bounded by `max_steps`);
    this one counts iterations up to `trainer.max_steps` (in iterations), so `it/s` is iterations
    per second, and a resumed run starts at the iteration it resumes from. The postfix holds the
    metrics logged with `prog_bar=True` (`loss_g`, `loss_d`), less those in `hidden`. While the bar
    is shown, the console handlers of Python logging and `warnings` print through `tqdm.write`, so
    log lines appear above the bar instead of over it.

    Args:
        description: the bar's label.
        optimizer_steps_per_iteration: Lightning's steps (`trainer.global_step`) per iteration;
            set by `addsr_pl.train` from the stage when null.
        hidden: progress-bar metrics left out of the postfix.
        refresh_rate: redraw every this many training batches.
    """

    def __init__(
        self,
        description: str,
        optimizer_steps_per_iteration: int | None,
        hidden: list[str],
        refresh_rate: int,
    ):
        super().__init__(refresh_rate=refresh_rate)
        self.description = description
        self.steps_per_iteration = int(optimizer_steps_per_iteration or 1)
        self.hidden = set(hidden)
        self._redirect: ExitStack | None = None

    @property
    def train_description(self) -> str:
        return self.description

    def iteration(self, trainer) -> int:
        return trainer.global_step // self.steps_per_iteration

    def total_iterations(self, trainer) -> int | None:
        return trainer.max_steps // self.steps_per_iteration if trainer.max_steps > 0 else None

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        return {k: v for k, v in items.items() if k not in self.hidden}

    def _redirect_console(self) -> None:
        if self._redirect is not None or self.is_disabled:
            return
        self._redirect = ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(loggers=console_loggers()))
        shown = warnings.showwarning
        warnings.showwarning = write_warning_above_bar
        self._redirect.callback(setattr, warnings, "showwarning", shown)

    def _restore_console(self) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        start = self.iteration(trainer)
        bar.reset(total=self.total_iterations(trainer))
        bar.initial = bar.n = start
        bar.set_description(self.description)
        self._redirect_console()

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar over all epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        n = self.iteration(trainer)
        if bar is not None and n != bar.n and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = self.iteration(trainer)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._restore_console()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()
        self._restore_console()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore_console()
