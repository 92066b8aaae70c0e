"""Training entry point: `python -m addsr_pl.train [overrides]`; `train(cfg)` runs in-process."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.utilities.rank_zero import rank_zero_only
from lightning_utilities.core import rank_zero as lightning_rank_zero
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar

from addsr_pl.callbacks import Preempted, Preemption, SignalAt
from addsr_pl.config import ConfigError, validate
from addsr_pl.method.export import export_student
from addsr_pl.method.lever_plan import PlanError
from addsr_pl.method.lever_probe import PLAN_CONFIG_KEY, plan_for_run
from addsr_pl.method.module import AddSRModule
from addsr_pl.method.psr_decoder import PsrDecoderModule, export_psr_decoder
from addsr_pl.method.teacher import TeacherModule, export_teacher
from addsr_pl.models.diffusion import MissingWeightsError, WeightsMismatchError
from addsr_pl.paths import config_dir
from addsr_pl.resume import (
    ResumeError,
    RunConfigInCheckpoint,
    check_allow_changes,
    check_resume,
    path_keys,
    resolve_ckpt_path,
)
from addsr_pl.runlock import RunLock, RunLockError

log = logging.getLogger(__name__)

# Lightning's step counter advances once per optimizer step: an AddSR iteration is a student and a
# discriminator step, a teacher iteration one step.
OPTIMIZER_STEPS_PER_ITERATION = {"addsr": 2, "teacher": 1, "psr_decoder": 1}


class StopMessageInIterations(logging.Filter):
    """Lightning ends a run with "`Trainer.fit` stopped: `max_steps=8` reached.", counted in optimizer
    steps; this says it in iterations, the unit `trainer.max_steps` is given in."""

    STOPPED = re.compile(r"`Trainer\.fit` stopped: `max_steps=(\d+)` reached\.")

    def __init__(self, steps_per_iteration: int):
        super().__init__()
        self.steps_per_iteration = steps_per_iteration

    def filter(self, record: logging.LogRecord) -> bool:
        stopped = self.STOPPED.fullmatch(record.getMessage())
        if stopped:
            iterations = int(stopped[1]) // self.steps_per_iteration
            record.msg, record.args = (
                f"Training stopped: `trainer.max_steps={iterations}` iterations reached.",
                (),
            )
        return True


@contextmanager
def stop_message_in_iterations(stage: str) -> Iterator[None]:
    """`StopMessageInIterations` on the logger Lightning's rank-zero messages go to, for one fit."""
    logger = lightning_rank_zero.log
    message = StopMessageInIterations(OPTIMIZER_STEPS_PER_ITERATION[stage])
    logger.addFilter(message)
    try:
        yield
    finally:
        logger.removeFilter(message)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks of `conf/callbacks`, counts in iterations converted to Lightning's steps; progress
    bars left out when `trainer.enable_progress_bar` is false."""
    callbacks = []
    show_bar = (cfg.get("trainer") or {}).get("enable_progress_bar", True)
    for node in (cfg.get("callbacks") or {}).values():
        node = OmegaConf.to_container(node, resolve=True)
        every = node.pop("every_n_iterations", None)
        if every:
            node["every_n_train_steps"] = every * OPTIMIZER_STEPS_PER_ITERATION[cfg.stage]
        if "optimizer_steps_per_iteration" in node and node["optimizer_steps_per_iteration"] is None:
            node["optimizer_steps_per_iteration"] = OPTIMIZER_STEPS_PER_ITERATION[cfg.stage]
        callback = instantiate(node)
        if isinstance(callback, ProgressBar) and not show_bar:
            continue
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list) -> pl.Trainer:
    """The Trainer, with `trainer.max_steps` read as iterations of the stage."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("max_steps", -1) > 0:
        trainer_cfg["max_steps"] *= OPTIMIZER_STEPS_PER_ITERATION[cfg.stage]
    if cfg.stage == "teacher":
        # automatic optimisation: Lightning accumulates (AddSR accumulates by hand, in the module)
        trainer_cfg["accumulate_grad_batches"] = cfg.method.accumulate_grad_batches
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)


def finish_wandb(exit_code: int) -> None:
    """End the run of this job, so multirun jobs never log into each other's runs."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


@contextmanager
def wandb_run_ends_with_job() -> Iterator[None]:
    """Whatever happens inside, this job's wandb run is finished on the way out: exit code 0, or 1
    (shown as failed) with the error re-raised, so the next job of a multirun starts its own run."""
    try:
        yield
    except BaseException:
        finish_wandb(exit_code=1)
        raise
    finish_wandb(exit_code=0)


def run_name(cfg: DictConfig) -> str:
    """This job's overrides (`hydra.job.override_dirname`, as its sweep folder), else `task_name`."""
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return overrides or cfg.task_name


def sweep_group(cfg: DictConfig) -> str | None:
    """The group shared by the jobs of one multirun: `<task_name>/<sweep folder name>`; None for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"{cfg.task_name}/{Path(HydraConfig.get().sweep.dir).name}"


WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(output_dir: Path) -> str | None:
    """This run dir's wandb run id: drawn once by global rank 0 and kept in `<run dir>/wandb_run_id.txt`.

    Other ranks never log to wandb; they read the file when it exists and never write it, so ranks
    started together (SLURM, torchrun) cannot race on it.
    """
    path = output_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if rank_zero_only.rank != 0:
        return None
    run_id = uuid.uuid4().hex[:8]  # wandb's own ids: 8 lower-case letters and digits
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers; a wandb logger without `name` / `group` gets this job's and sweep's."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        node = OmegaConf.to_container(node, resolve=True)
        if str(node.get("_target_", "")).endswith("WandbLogger"):
            node["name"] = node.get("name") or run_name(cfg)
            node["group"] = node.get("group") or sweep_group(cfg)
            # a resumed (or requeued) run goes on logging into the wandb run it started
            node["id"] = node.get("id") or wandb_run_id(Path(cfg.paths.output_dir))
            node["resume"] = node.get("resume") or "allow"
        loggers.append(instantiate(node))
    return loggers


def resolved_config(cfg: DictConfig) -> dict:
    """The run's fully resolved config (Hydra's own node left out), as loggers record it."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """The stage's LightningModule: AddSRModule (stage=addsr) or TeacherModule (stage=teacher)."""
    module_cls = {"teacher": TeacherModule, "psr_decoder": PsrDecoderModule}.get(cfg.stage, AddSRModule)
    return module_cls(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        conditioning=OmegaConf.to_container(cfg.conditioning, resolve=True),
        method=OmegaConf.to_container(cfg.method, resolve=True),
        seed=cfg.seed,
    )


def build_module_for_run(cfg: DictConfig) -> pl.LightningModule:
    """`build_module`, with the run's fault injection (`fault.*`) attached."""
    module = build_module(cfg)
    inject = (cfg.get("fault") or {}).get("nan_loss_at_iteration")
    if inject is not None:
        if not hasattr(module, "nonfinite"):
            raise ValueError(
                f"fault.nan_loss_at_iteration is not supported for stage={cfg.stage}; set it to null."
            )
        module.nonfinite.inject_at_iteration = int(inject)
    return module


def export(cfg: DictConfig, module: pl.LightningModule) -> dict:
    """Write what the stage trained: the EMA student (`student/`) or the teacher (`teacher/`)."""
    out = Path(cfg.paths.output_dir)
    if cfg.stage == "psr_decoder":
        folder = export_psr_decoder(module, out, cfg.get("student_dir"))
        print(f"Exported PSR decoder: {folder}")
        return {"psr_decoder": str(folder)}
    if cfg.stage == "teacher":
        if not cfg.get("export_teacher", True):
            return {}
        teacher = export_teacher(module, out / "teacher")
        log.info("Exported the teacher to %s", teacher)
        print(f"Exported teacher: {teacher}")
        return {"teacher": str(teacher)}
    if not cfg.export_student:
        return {}
    scale = int(cfg.data.scale)
    inference = {"psr": cfg.method.psr, "psr_weight": cfg.method.inference_psr_weight}
    student = export_student(module, out / "student", scale, inference, cfg.paths.weights_dir)
    log.info("Exported the EMA student to %s", student)
    print(f"Exported student: {student}")
    return {"student": str(student)}


def takes_run_lock() -> bool:
    """Global rank 0 takes the run dir's lock: the launching process under Lightning's `ddp` launcher
    (its ranks run inside its lifetime), rank 0 under torchrun or SLURM (which set the rank before start)."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


@contextmanager
def signals_handled(preemption: Preemption | None) -> Iterator[None]:
    """Pre-emption signals handled from here on: a signal at start-up stops every rank with the
    pre-emption exit code (see `Preemption`)."""
    if preemption is None:
        yield
        return
    preemption.install()
    try:
        yield
    finally:
        preemption.uninstall()


def train(cfg: DictConfig) -> dict:
    """Train (and export) one AddSR student, or its teacher with `stage=teacher`.

    Returns the final metrics, the run's output dir, the exported folder (`student` or `teacher`,
    if any), and the module, datamodule and trainer objects, for callers that go on in-process.
    """
    validate(cfg)
    config = resolved_config(cfg)
    allowed = list((cfg.get("resume") or {}).get("allow_changes") or [])
    check_allow_changes(allowed, config)
    callbacks = build_callbacks(cfg)
    signal_at = (cfg.get("fault") or {}).get("signal_at")
    if signal_at is not None:
        callbacks.insert(0, SignalAt(signal_at, signal.SIGTERM))
    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    lock = cfg.run_lock
    with (
        signals_handled(preemption),
        RunLock(cfg.paths.output_dir, lock.heartbeat_s, lock.stale_after_s, enabled=takes_run_lock()),
    ):
        try:
            ckpt_path = resolve_ckpt_path(cfg)
            changes = check_resume(ckpt_path, config, allowed, path_keys(cfg)) if ckpt_path else {}
            callbacks.append(RunConfigInCheckpoint(config, changes))
            return fit_and_export(cfg, config, callbacks, ckpt_path, preemption)
        except Preempted:
            if preemption is not None:
                preemption.wait_for_started_ranks()  # before the lock goes: no rank outlives the run
            raise


def fit_and_export(
    cfg: DictConfig, config: dict, callbacks: list, ckpt_path: str | None, preemption: Preemption | None
) -> dict:
    """Build the module, data and trainer, fit (resuming from `ckpt_path`, already checked) and export;
    `preemption` is the pre-emption callback among `callbacks` (None without one)."""
    with wandb_run_ends_with_job():
        if cfg.stage == "addsr":  # levers and micro-batch into cfg before the data and the module exist
            config[PLAN_CONFIG_KEY] = plan_for_run(cfg, ckpt_path).as_dict()
        pl.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        module = build_module_for_run(cfg)
        loggers = build_loggers(cfg)
        for logger in loggers:
            if hasattr(logger, "log_hyperparams"):
                logger.log_hyperparams(config)
        trainer = build_trainer(cfg, callbacks, loggers)
        if preemption is not None:
            preemption.attach(trainer)
        # the checkpoint was checked by `check_resume`; Lightning reads it as data too
        with stop_message_in_iterations(cfg.stage):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if preemption is not None:
            preemption.leave_training()
        result = {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "output_dir": cfg.paths.output_dir,
            "module": module,
            "datamodule": datamodule,
            "trainer": trainer,
        }
        # every rank has finished training (and saved) before rank 0 exports alone
        trainer.strategy.barrier("export")
        if trainer.is_global_zero:
            result |= export(cfg, module)
    return result


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        result = train(cfg)
    except (ConfigError, ResumeError, RunLockError, PlanError, InstantiationException) as error:
        # Hydra wraps what a component raises; a weight folder that is missing or does not fit is the
        # user's to fix like a wrong value
        cause = error.__cause__ if isinstance(error, InstantiationException) else error
        fixable = (
            ConfigError,
            ResumeError,
            RunLockError,
            PlanError,
            MissingWeightsError,
            WeightsMismatchError,
        )
        if not isinstance(cause, fixable) or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one bad cell of a sweep fails that job, not the sweep
        # a wrong value or a refused resume: the message names the fix, no traceback (exit code 2)
        print(f"addsr-pl train: error: {cause}", file=sys.stderr)
        sys.exit(2)
    return result["metrics"].get("val/psnr_1step")


# Hydra launchers that live in an optional extra: (plugin module, extra). Without the plugin Hydra only
# says it "could not load 'hydra/launcher/submitit_slurm'", before any code here runs.
LAUNCHER_EXTRAS = {"slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm")}


def check_launcher_extras(overrides: list[str]) -> None:
    """Exit with one line naming the pip command when a `hydra/launcher=` override needs a missing extra."""
    import importlib.util

    for override in overrides:
        group, _, name = override.partition("=")
        if group.lstrip("+~") != "hydra/launcher" or name not in LAUNCHER_EXTRAS:
            continue
        module, extra = LAUNCHER_EXTRAS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            print(
                f"addsr-pl train: error: hydra/launcher={name} needs hydra-submitit-launcher, which is not "
                f'installed: pip install -e ".[{extra}]"',
                file=sys.stderr,
            )
            sys.exit(2)


if __name__ == "__main__":
    check_launcher_extras(sys.argv[1:])
    main()
