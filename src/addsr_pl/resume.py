"""Resume that is exact or refuses: which checkpoint `ckpt_path` means, and what may change on resume.

* `ckpt_path: null` starts fresh, and refuses to when the run dir already holds checkpoints.
* `ckpt_path: last` takes the newest of `<checkpoint dir>/last.ckpt` and SLURM's `hpc_ckpt_*.ckpt`
  (none yet: a fresh start, so one command serves a job's first start and its requeues).
* Every checkpoint carries the run's resolved config; on resume the `method`, `model`, `data`,
  `conditioning` and `seed` of the new config must equal it, except keys under `resume.allow_changes`.
  Allowed changes of optimizer hyper-parameters are applied over the restored optimizer state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

CONFIG_KEY = "addsr_config"
# Sections whose change alters what is trained; trainer, logger, callbacks, paths and the like pass.
COMPARED_SECTIONS = ("method", "model", "data", "conditioning", "seed")
# Restored from the checkpoint whatever the config says: refused even when allowed.
RESTORED_STATE = ("method.lr_scheduler", "method.optimizer_g._target_", "method.optimizer_d._target_")
OPTIMIZERS = ("optimizer_g", "optimizer_d")  # in the order of configure_optimizers


class ResumeError(RuntimeError):
    """The requested start or resume would not continue the run exactly."""


def checkpoint_dir(cfg: DictConfig) -> Path:
    node = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    return Path(node.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints")


def existing_checkpoints(cfg: DictConfig) -> list[Path]:
    found = sorted(checkpoint_dir(cfg).glob("*.ckpt")) if checkpoint_dir(cfg).is_dir() else []
    return found + sorted(Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt"))


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint file `cfg.ckpt_path` names, or None for a fresh start (see the module doc)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        found = existing_checkpoints(cfg)
        if found:
            names = ", ".join(p.name for p in found[:5])
            raise ResumeError(
                f"ckpt_path is null (a fresh start) but {cfg.paths.output_dir} already holds checkpoints "
                f"({names}). To continue that run: ckpt_path=last. To start a new run: give it its own "
                "folder, hydra.run.dir=<new folder> (or leave hydra.run.dir at its dated default)."
            )
        return None
    if ckpt_path == "last":
        candidates = [checkpoint_dir(cfg) / "last.ckpt", *Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt")]
        candidates = [p for p in candidates if p.is_file()]
        if not candidates:
            log.info("ckpt_path=last: no checkpoint in %s yet; starting fresh.", checkpoint_dir(cfg))
            return None
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    if not Path(ckpt_path).is_file():
        raise ResumeError(f"ckpt_path={ckpt_path}: no such checkpoint file.")
    return str(ckpt_path)


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Dotted keys of nested dicts and lists: {"a.b": 1, "a.c.0": 2}."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list | tuple):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in items:
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    if not out:
        out[prefix] = node  # an empty dict or list is a value of its own
    return out


def changed_keys(saved: dict, current: dict, sections=COMPARED_SECTIONS) -> list[str]:
    """Dotted keys of `sections` whose value differs, is new or is gone, sorted."""
    old = flatten({s: saved[s] for s in sections if s in saved})
    new = flatten({s: current[s] for s in sections if s in current})
    return sorted(k for k in old.keys() | new.keys() if old.get(k, KeyError) != new.get(k, KeyError))


def is_allowed(key: str, allowed) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allowed)


def saved_config(checkpoint: dict) -> dict:
    """The resolved config a checkpoint was written with (older ones: the module's hyper-parameters)."""
    if CONFIG_KEY in checkpoint:
        return checkpoint[CONFIG_KEY]
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    log.warning(
        "This checkpoint records no run config; only model, conditioning, method and seed are compared."
    )
    return {k: hparams[k] for k in ("model", "conditioning", "method", "seed") if k in hparams}


def check_resume(ckpt_path: str, current: dict, allowed) -> dict[str, tuple]:
    """Refuse a resume whose config changed outside `allowed`; return the allowed changes (old, new)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    saved = saved_config(checkpoint)
    sections = [s for s in COMPARED_SECTIONS if s in saved]
    changed = changed_keys(saved, current, sections)
    refused = [k for k in changed if not is_allowed(k, allowed) or is_allowed(k, RESTORED_STATE)]
    if refused:
        old, new = flatten(saved), flatten(current)
        lines = "\n  ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in refused)
        fixed = [k for k in refused if is_allowed(k, RESTORED_STATE)]
        allowable = [k for k in refused if k not in fixed]
        raise ResumeError(
            f"Resuming {ckpt_path} with a different config:\n  {lines}\n"
            "Resume with the checkpoint's values"
            + (
                f", or allow the changes explicitly: resume.allow_changes=[{','.join(allowable)}]"
                if allowable
                else ""
            )
            + (f"; {', '.join(fixed)} come back from the checkpoint and cannot change" if fixed else "")
            + "; or start a new run in a new hydra.run.dir."
        )
    old, new = flatten(saved), flatten(current)
    if changed:
        log.warning("Resuming with allowed config changes: %s", ", ".join(changed))
    return {k: (old.get(k), new.get(k)) for k in changed}


class RunConfigInCheckpoint(pl.Callback):
    """Writes the run's resolved config into every checkpoint; applies allowed optimizer changes.

    Lightning restores each optimizer's hyper-parameters (lr, betas, weight decay) from the
    checkpoint; an allowed change of `method.optimizer_g.*` / `method.optimizer_d.*` is set again on
    the restored param groups at train start (an lr keeps the scheduler's current factor).
    """

    def __init__(self, config: dict, changes: dict[str, tuple] | None = None):
        self.config = config
        self.changes = changes or {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config

    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = pl_module.optimizers(use_pl_optimizer=False)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        done = set()
        for key, (old, _) in self.changes.items():
            parts = key.split(".")
            if (
                len(parts) < 3
                or parts[0] != "method"
                or parts[1] not in OPTIMIZERS
                or tuple(parts[1:3]) in done
            ):
                continue
            done.add(tuple(parts[1:3]))
            optimizer, name = optimizers[OPTIMIZERS.index(parts[1])], parts[2]
            new = self.config["method"][parts[1]][name]
            for group_index, group in enumerate(optimizer.param_groups):
                if name == "lr":
                    group["lr"] = new * (group["lr"] / old if old else 1.0)  # keep the scheduler's factor
                    group["initial_lr"] = new
                    for scheduler in schedulers:
                        if scheduler.optimizer is optimizer:
                            scheduler.base_lrs[group_index] = new
                else:
                    group[name] = tuple(new) if isinstance(group[name], tuple) else new
            log.info("Resume: method.%s.%s set to %r over the restored optimizer state.", parts[1], name, new)
