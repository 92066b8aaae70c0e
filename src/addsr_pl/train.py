"""Training entry point: `python -m addsr_pl.train [overrides]`; `train(cfg)` runs in-process."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from addsr_pl.config import validate
from addsr_pl.method.export import export_student
from addsr_pl.method.module import AddSRModule
from addsr_pl.paths import config_dir

log = logging.getLogger(__name__)

# Lightning's step counter advances once per optimizer step: a student and a discriminator step
# make one AddSR iteration.
OPTIMIZER_STEPS_PER_ITERATION = 2


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():
        node = OmegaConf.to_container(node, resolve=True)
        every = node.pop("every_n_iterations", None)
        if every:
            node["every_n_train_steps"] = every * OPTIMIZER_STEPS_PER_ITERATION
        callbacks.append(instantiate(node))
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list) -> pl.Trainer:
    """The Trainer, with `trainer.max_steps` read as AddSR iterations."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("max_steps", -1) > 0:
        trainer_cfg["max_steps"] *= OPTIMIZER_STEPS_PER_ITERATION
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)


def finish_wandb(exit_code: int) -> None:
    """End the run of this job, so multirun jobs never log into each other's runs."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def resolved_config(cfg: DictConfig) -> dict:
    """The run's fully resolved config (Hydra's own node left out), as loggers record it."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def train(cfg: DictConfig) -> dict:
    """Train (and export) one AddSR student.

    Returns the final metrics, the run's output dir, the exported student folder (if any), and the
    module, datamodule and trainer objects, for callers that go on in-process.
    """
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = AddSRModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        conditioning=OmegaConf.to_container(cfg.conditioning, resolve=True),
        method=OmegaConf.to_container(cfg.method, resolve=True),
        seed=cfg.seed,
    )
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(resolved_config(cfg))
    trainer = build_trainer(cfg, build_callbacks(cfg), loggers)
    exit_code = 1
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        exit_code = 0
    finally:
        finish_wandb(exit_code)
    result = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "output_dir": cfg.paths.output_dir,
        "module": module,
        "datamodule": datamodule,
        "trainer": trainer,
    }
    if cfg.export_student and trainer.is_global_zero:
        scale = int(cfg.data.scale)
        inference = {"psr": cfg.method.psr, "psr_weight": cfg.method.inference_psr_weight}
        student = export_student(module, Path(cfg.paths.output_dir) / "student", scale, inference)
        log.info("Exported the EMA student to %s", student)
        print(f"Exported student: {student}")
        result["student"] = str(student)
    return result


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    return result["metrics"].get("val/psnr_1step")


if __name__ == "__main__":
    main()
