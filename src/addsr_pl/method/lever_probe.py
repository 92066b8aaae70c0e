"""The probe of `method.memory.plan=auto`, and the plan of a training run (addsr_pl.train calls `plan_for_run`).

On one CUDA device the probe builds the run's module once more, then for each lever combination at two
micro-batches runs a few real training iterations on random images of the run's crop size (a Trainer of
its own, the run's precision, accumulation 1), reading `torch.cuda.max_memory_allocated` and the median
seconds per iteration; a point that runs out of memory is recorded as not fitting. The probe runs
uncompiled (`method.speed.compile` would compile each micro-batch anew), with the frozen half's CUDA graphs
as configured (their memory is part of the peak): the choice is made on eager code's times and peaks; how
compiled code compares is the GPU check's to measure (its `train_step_compiled` section). The choice is then
measured too if it was only predicted, and the probe's module and memory are released before the run's
own module is built.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from addsr_pl.method.lever_plan import (
    AUTO,
    MICRO_BATCH,
    PLAN_LEVERS,
    LeverChoice,
    Measurement,
    check_micro_batch,
    choose_levers,
    effective_batch,
    lever_candidates,
    manual_choice,
    probe_micro_batches,
    set_by_user,
)
from addsr_pl.method.memory import switch_gradient_checkpointing
from addsr_pl.method.memory_plan import GIB, module_memory_plan

log = logging.getLogger(__name__)


class RandomPairs(torch.utils.data.Dataset):
    """HR crops of uniform noise and their LR (every `scale`-th pixel): the probe's data, as large as the run's."""

    def __init__(self, length: int, crop: int, scale: int):
        self.length, self.crop, self.scale = length, crop, scale

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        hr = torch.rand(3, self.crop, self.crop, generator=torch.Generator().manual_seed(i))
        return {"hr": hr, "lr": hr[:, :: self.scale, :: self.scale].contiguous()}


def training_only_trainer(iterations: int, *, accelerator: str, precision: str, callbacks: list,
                          devices: int = 1, strategy="auto") -> pl.Trainer:  # fmt: skip
    """A Trainer that trains `iterations` optimizer steps of the student (each with its discriminator
    step) and nothing else: no logger, checkpoint, progress bar, summary or validation. The probe's and
    the benches' measurements run under it."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_steps=2 * iterations,  # Lightning counts the student's and the discriminator's steps
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


class StepTimer(pl.Callback):
    """Seconds of each training step after the first `warmup`, the device drained around each."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


@contextmanager
def quiet():
    """Lightning's start-up lines and the static plan's table once per probe point would bury the plan."""
    loggers = [
        logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "addsr_pl.method.memory_plan")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def set_levers(module, levers: dict) -> None:
    """Put `levers` in force on a built module: checkpointing switched per network as the module's build
    does, the decode chunk read by `teacher_targets` at run time."""
    switch_gradient_checkpointing(module.student.networks().values(), module.codec, levers)
    module.method["memory"] |= {k: levers[k] for k in PLAN_LEVERS}


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def measure(
    module, levers: dict, micro_batch: int, crop: int, scale: int, precision, probe: dict
) -> Measurement:
    """One probe point: `probe["warmup"]` + `probe["iterations"]` training iterations of `module` with
    `levers` at `micro_batch`; peak and time inf when it runs out of memory."""
    set_levers(module, levers)
    release()
    timer = StepTimer(probe["warmup"])
    steps = probe["warmup"] + probe["iterations"]
    trainer = training_only_trainer(steps, accelerator="gpu", precision=precision, callbacks=[timer])
    loader = torch.utils.data.DataLoader(
        RandomPairs(micro_batch * steps, crop, scale), batch_size=micro_batch
    )
    try:
        with quiet():
            trainer.fit(module, train_dataloaders=loader)
        peak, seconds = torch.cuda.max_memory_allocated() / GIB, statistics.median(timer.times)
    except RuntimeError as error:
        if not is_oom(error):
            raise
        peak = seconds = math.inf
    finally:
        del trainer
        for p in module.parameters():
            p.grad = None
        module.use_speed(module.speed)  # fresh regions: the point's CUDA graphs and their memory go
        release()
    log.info("probe %s, micro-batch %d: peak %.2f GiB, %.3f s", levers, micro_batch, peak, seconds)
    return Measurement(dict(levers), micro_batch, peak, seconds)


def probe_and_choose(
    module, memory: dict, effective: int, cap_gib: float, crop: int, scale: int, precision
) -> LeverChoice:
    """Measure every lever candidate at the probe's micro-batches, choose, and measure the choice itself
    where it was only predicted (choosing again if it does not fit)."""
    probe = memory["probe"]
    measurements = []
    for levers in lever_candidates(memory):
        for b in probe_micro_batches(effective, memory[MICRO_BATCH]):
            point = measure(module, levers, b, crop, scale, precision, probe)
            measurements.append(point)
            if math.isinf(point.peak_gib):
                break  # a larger micro-batch of these levers does not fit either
    static_gib = module_memory_plan(module, cap_gib).device_gib  # after the Trainer cast the frozen parts
    while True:
        choice = choose_levers(
            measurements,
            static_gib,
            cap_gib,
            probe["margin_gib"],
            effective,
            memory[MICRO_BATCH],
            set_by_user(memory),
        )
        done = {(m.key, m.micro_batch) for m in measurements}
        key = tuple(choice.levers[k] for k in PLAN_LEVERS)
        if (key, choice.micro_batch) in done:
            return choice
        measurements.append(measure(module, choice.levers, choice.micro_batch, crop, scale, precision, probe))


def one_cuda_process(cfg: DictConfig) -> str | None:
    """None when the run trains on one CUDA device in one process; else why the plan does not probe."""
    trainer = cfg.trainer
    if not torch.cuda.is_available() or str(trainer.get("accelerator", "auto")) not in (
        "auto",
        "gpu",
        "cuda",
    ):
        return "cpu"
    devices = trainer.get("devices", 1)
    one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one or int(trainer.get("num_nodes", 1)) != 1 or os.environ.get("WORLD_SIZE", "1") != "1":
        return "several processes"
    return None


NOT_PROBED = {
    "cpu": "method.memory.plan=auto applies on CUDA only: this run uses the configured values ({}).",
    "several processes": "method.memory.plan=auto probes one CUDA device in one process; with several each "
    "would probe alone and could choose differently, so this run uses the configured values ({}). Set the "
    "levers from a one-GPU run's plan.",
}


def saved_plan(ckpt_path: str | None) -> dict | None:
    """The plan recorded in the run config of the checkpoint a run resumes, if any (read as data)."""
    if ckpt_path is None:
        return None
    from addsr_pl.resume import read_checkpoint, saved_config

    return saved_config(read_checkpoint(ckpt_path)).get(PLAN_CONFIG_KEY)


def kept_plan(saved: dict | None, memory: dict, effective: int) -> LeverChoice | None:
    """The checkpoint's choice for a resumed run, with the values set now put over it; None (probe again)
    when there is none or the effective batch changed since."""
    if saved is None or saved["micro_batch"] * saved["accumulate_grad_batches"] != effective:
        return None
    choice = replace(LeverChoice.from_dict(saved), mode="auto, kept from the checkpoint")
    for key in PLAN_LEVERS:
        if memory[key] != AUTO:
            choice.levers[key], choice.reasons[key] = memory[key], "set by you"
    if memory[MICRO_BATCH] != AUTO:
        choice.micro_batch = int(memory[MICRO_BATCH])
        choice.accumulate = effective // choice.micro_batch
        choice.reasons["micro-batch x accumulation"] = "set by you"
    return choice


# where the run's config (written into every checkpoint) records the plan's choice
PLAN_CONFIG_KEY = "lever_plan"


def plan_for_run(cfg: DictConfig, ckpt_path: str | None = None) -> LeverChoice:
    """The levers and micro-batch of an AddSR run; written into `cfg` (`data.batch_size`,
    `method.accumulate_grad_batches`, the module's levers) before the data and the module are built.
    A resumed run (`ckpt_path`) keeps the choice its checkpoint records, so that it continues with the
    micro-batch, accumulation and levers it was trained with (no probe)."""
    memory = OmegaConf.to_container(cfg.method.memory, resolve=True)
    batch_size, accumulate = int(cfg.data.batch_size), int(cfg.method.accumulate_grad_batches)
    effective = effective_batch(batch_size, accumulate)
    check_micro_batch(memory[MICRO_BATCH], effective)
    why_not = one_cuda_process(cfg) if memory["plan"] == AUTO else "manual"
    if why_not is not None:
        choice = manual_choice(memory, batch_size, accumulate, why_not)
        if why_not != "manual":
            print(NOT_PROBED[why_not].format(choice.summary()))
    elif (saved := kept_plan(saved_plan(ckpt_path), memory, effective)) is not None:
        choice = saved
    else:
        choice = probe_run(cfg, memory, effective)
    if why_not is None:
        print(choice.table(), flush=True)
    cfg.data.batch_size = choice.micro_batch
    cfg.method.accumulate_grad_batches = choice.accumulate
    for key in PLAN_LEVERS:
        cfg.method.memory[key] = choice.levers[key]
    return choice


def probe_run(cfg: DictConfig, memory: dict, effective: int) -> LeverChoice:
    """Build the run's module once for the probe (accumulation 1), probe, choose, release it."""
    from addsr_pl.method.module import AddSRModule

    cap = memory["memory_cap"] or torch.cuda.get_device_properties(0).total_memory / GIB
    method = OmegaConf.to_container(cfg.method, resolve=True)
    method["accumulate_grad_batches"] = 1
    # uncompiled: each micro-batch would be a compilation of its own (minutes at real size); the frozen half's
    # CUDA graphs stay as configured, their memory is part of the peak
    method["speed"] = method["speed"] | {"compile": "none"}
    method["memory"] |= lever_candidates(memory)[0]
    start = time.perf_counter()
    module = AddSRModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        conditioning=OmegaConf.to_container(cfg.conditioning, resolve=True),
        method=method,
        seed=cfg.seed,
    )
    try:
        choice = probe_and_choose(
            module,
            memory,
            effective,
            cap,
            int(cfg.data.crop_size),
            int(cfg.data.scale),
            cfg.trainer.precision,
        )
    finally:
        del module
        release()
    log.info("lever plan probe: %.1f s", time.perf_counter() - start)
    return choice
