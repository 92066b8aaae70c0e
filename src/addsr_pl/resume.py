"""Resume that is exact or refuses: which checkpoint `ckpt_path` means, and what may change on resume.

* Checkpoints are data: every read checks that the file is an intact torch zip archive (its CRCs) and
  loads it with `weights_only=True`, so a pickled object in a checkpoint is refused, never run. A
  damaged, truncated, empty or foreign file is refused with one line naming it and the problem.
* `ckpt_path: null` starts fresh, and refuses to when the run dir already holds checkpoints.
* `ckpt_path: last` takes the checkpoint of the run dir with the highest iteration, read from each
  file's own `global_step` (never from file times, which a copy of the run dir renews): `last.ckpt`,
  the periodic `step<N>.ckpt`, and SLURM's `hpc_ckpt_*.ckpt`; on a tie `last.ckpt`, then `hpc_ckpt`.
  None yet: a fresh start, so one command serves a job's first start and its requeues.
* Every checkpoint carries the run's resolved config; on resume the `method`, `model`, `data`,
  `conditioning` and `seed` of the new config must equal it, except keys under `resume.allow_changes`
  and keys whose value comes from `paths.*` (folders of weights and caches may move); `method.speed` and
  the memory plan's levers are never compared (how fast and in how much memory, not what is computed).
  Allowed changes of optimizer hyper-parameters are applied over the restored optimizer state. An unknown
  key in `resume.allow_changes` is refused, naming the closest known one.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import re
import zipfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from addsr_pl.method.lever_plan import PLAN_LEVERS
from addsr_pl.method.memory_plan import PLAN_SETTINGS

log = logging.getLogger(__name__)

CONFIG_KEY = "addsr_config"
# Sections whose change alters what is trained; trainer, logger, callbacks, paths and the like pass.
COMPARED_SECTIONS = ("method", "model", "data", "conditioning", "seed")
# How fast the iteration runs or how much memory it takes, not what it computes: never compared (a run
# resumes compiled or eager, with or without checkpointing). memory.compile_student and compile_options were
# method.speed's before it, and the plan's levers were true/2 before plan=auto: older checkpoints hold them.
# The effective batch stays compared (data.batch_size, method.accumulate_grad_batches).
NOT_COMPARED = (
    "method.speed",
    "method.memory.compile_student",
    "method.memory.compile_options",
    *(f"method.memory.{key}" for key in (*PLAN_SETTINGS, *PLAN_LEVERS)),
)
# Restored from the checkpoint whatever the config says: refused even when allowed.
RESTORED_STATE = ("method.lr_scheduler", "method.optimizer_g._target_", "method.optimizer_d._target_")
OPTIMIZERS = ("optimizer_g", "optimizer_d")  # in the order of configure_optimizers
# A value that interpolates one of these names only where files are: it may change on resume.
PATH_INTERPOLATION = re.compile(r"\$\{paths\.")
LAST = "last.ckpt"
HPC_PATTERN = "hpc_ckpt_*.ckpt"


class ResumeError(RuntimeError):
    """The requested start or resume would not continue the run exactly."""


def checkpoint_dir(cfg: DictConfig) -> Path:
    node = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    return Path(node.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints")


def existing_checkpoints(cfg: DictConfig) -> list[Path]:
    found = sorted(checkpoint_dir(cfg).glob("*.ckpt")) if checkpoint_dir(cfg).is_dir() else []
    return found + sorted(Path(cfg.paths.output_dir).glob(HPC_PATTERN))


def refuse(path, problem: str) -> ResumeError:
    return ResumeError(
        f"checkpoint {path}: {problem}. Resume from another one (ckpt_path=<file>), or move this one out "
        "of the run dir for ckpt_path=last."
    )


def unpickling_problem(error: Exception) -> str:
    """The object a weights-only load refused, from torch's message (e.g. `GLOBAL posix.system`)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = found.group(1) if found else str(error).splitlines()[0]
    return f"holds a pickled object ({what}) that a weights-only load refuses, so it was not loaded"


def read_checkpoint(path, verify: bool = True) -> dict:
    """A checkpoint read as data: an intact torch zip archive (CRCs checked when `verify`), loaded with
    `weights_only=True` (tensors memory-mapped, so only the structure is read), holding a training
    checkpoint's `state_dict` and `global_step`. Anything else raises `ResumeError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"ckpt_path={path}: no such checkpoint file.")
    if path.stat().st_size == 0:
        raise refuse(path, "empty file (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise refuse(path, "not a torch zip archive (truncated, or not written by torch.save)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip() if verify else None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise refuse(path, f"damaged zip archive ({error})") from None
    if damaged is not None:
        raise refuse(path, f"damaged: the checksum of its record {damaged} does not match")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise refuse(path, unpickling_problem(error)) from None
    except Exception as error:  # torch's reader reports damage as RuntimeError, ValueError, ...
        raise refuse(path, f"unreadable ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise refuse(path, "not a training checkpoint (no state_dict)")
    if not isinstance(checkpoint.get("global_step"), int):
        raise refuse(path, "not a training checkpoint (no global_step)")
    return checkpoint


def newest_checkpoint(candidates: list[Path]) -> tuple[Path, int]:
    """The candidate with the highest `global_step` (ties: last.ckpt, then the newest hpc_ckpt)."""

    def preference(path: Path) -> tuple[int, int]:
        if path.name == LAST:
            return 2, 0
        hpc = re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name)
        return (1, int(hpc.group(1))) if hpc else (0, 0)

    steps = {path: read_checkpoint(path, verify=False)["global_step"] for path in candidates}
    best = max(candidates, key=lambda p: (steps[p], *preference(p)))
    return best, steps[best]


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
        candidates = existing_checkpoints(cfg)
        if not candidates:
            log.info("ckpt_path=last: no checkpoint in %s yet; starting fresh.", checkpoint_dir(cfg))
            return None
        path, step = newest_checkpoint(candidates)
        log.info(
            "ckpt_path=last: resuming from %s (global step %d, the highest of %d).",
            path,
            step,
            len(candidates),
        )
        return str(path)
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
    return sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k, KeyError) != new.get(k, KeyError) and not is_allowed(k, NOT_COMPARED)
    )


def is_allowed(key: str, allowed) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allowed)


def path_keys(cfg: DictConfig) -> set[str]:
    """Dotted keys of the compared sections whose value is taken from `paths.*` (e.g.
    `model.components.cache_dir: ${paths.cache_dir}`): they name where files are, not what is trained."""
    keys = set()
    for section in COMPARED_SECTIONS:
        node = cfg.get(section)
        if OmegaConf.is_config(node):
            raw = flatten(OmegaConf.to_container(node, resolve=False), section)
            keys |= {k for k, v in raw.items() if isinstance(v, str) and PATH_INTERPOLATION.search(v)}
    return keys


def check_allow_changes(allowed, current: dict, saved: dict | None = None) -> None:
    """Refuse a key of `resume.allow_changes` that names nothing in the config (a typo would
    otherwise pass silently and leave the change it meant refused, or the wrong one allowed)."""
    keys = flatten(current) | flatten({s: saved[s] for s in COMPARED_SECTIONS if s in (saved or {})})
    known = {".".join(k.split(".")[:n]) for k in keys for n in range(1, k.count(".") + 2)}
    for key in allowed:
        if str(key) not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ResumeError(
                f"resume.allow_changes: unknown key {key!r}{hint} (dotted keys of "
                f"{', '.join(COMPARED_SECTIONS)}, e.g. method.optimizer_g.lr)"
            )


def saved_config(checkpoint: dict) -> dict:
    """The resolved config a checkpoint was written with (older ones: the module's hyper-parameters)."""
    if CONFIG_KEY in checkpoint:
        return checkpoint[CONFIG_KEY]
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    log.warning(
        "This checkpoint records no run config; only model, conditioning, method and seed are compared."
    )
    return {k: hparams[k] for k in ("model", "conditioning", "method", "seed") if k in hparams}


def check_resume(ckpt_path: str, current: dict, allowed, moved=frozenset()) -> dict[str, tuple]:
    """Refuse a resume whose config changed outside `allowed` and the path keys `moved`; return the
    allowed changes (old, new). The checkpoint is read as data (`read_checkpoint`)."""
    saved = saved_config(read_checkpoint(ckpt_path))
    if not isinstance(saved, dict):
        raise refuse(ckpt_path, f"its run config is a {type(saved).__name__}, not a mapping")
    check_allow_changes(allowed, current, saved)
    sections = [s for s in COMPARED_SECTIONS if s in saved]
    changed = changed_keys(saved, current, sections)
    refused = [
        k for k in changed if (not is_allowed(k, allowed) and k not in moved) or is_allowed(k, RESTORED_STATE)
    ]
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
    paths = [k for k in changed if k in moved and not is_allowed(k, allowed)]
    if paths:
        log.warning(
            "Resuming with moved paths (the files there must be the ones the run started with): %s",
            "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in paths),
        )
    if len(paths) < len(changed):
        log.warning(
            "Resuming with allowed config changes: %s", ", ".join(k for k in changed if k not in paths)
        )
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
