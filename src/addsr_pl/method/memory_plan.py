"""The static memory of a training run, from parameter counts and dtypes, known before the first step.

Weights (parameters and buffers: SD3's positional embedding is a 226 M-element buffer), gradients,
optimiser state and EMA per component (trainable and frozen), with the levers of
`method.memory` in force: weights the student shares with the teacher are counted once, the EMA is
counted where it lives. What is left of the device for activations decides the batch that fits;
bench/train_step.py measures the activations per batch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

GIB = 2**30
# keys of `method.memory` that configure the lever plan (method/lever_plan.py) rather than being levers
PLAN_SETTINGS = ("plan", "memory_cap", "micro_batch", "manual", "probe")
# how the plan names a denoiser's networks
NETWORK_NAMES = {"unet": "UNet", "controlnet": "ControlNet"}
# Optimiser state bytes per trained parameter: AdamW keeps two fp32 moments; bitsandbytes' 8-bit AdamW
# keeps two uint8 moments plus one fp32 absmax per 256-value block of each.
OPTIMIZER_STATE_BYTES = {
    "torch.optim.AdamW": 8.0,
    "torch.optim.Adam": 8.0,
    "bitsandbytes.optim.AdamW8bit": 2.0 + 2 * 4 / 256,
    "bitsandbytes.optim.PagedAdamW8bit": 2.0 + 2 * 4 / 256,
}


@dataclass
class ComponentMemory:
    name: str
    params_m: float  # millions of parameters held by this component (shared ones counted once)
    buffers_m: float  # millions of buffer elements (non-trained tensors the weights include)
    trainable_m: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    ema_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.ema_gib


@dataclass
class MemoryPlan:
    components: list[ComponentMemory]
    device_gib: float  # static memory on the training device
    host_gib: float  # static memory kept in host memory (an EMA placed on the CPU)
    levers: dict
    capacity_gib: float | None = None  # the device's memory, when known

    @property
    def headroom_gib(self) -> float | None:
        return None if self.capacity_gib is None else self.capacity_gib - self.device_gib

    def as_dict(self) -> dict:
        return {
            "components": [asdict(c) | {"total_gib": c.total_gib} for c in self.components],
            "device_gib": self.device_gib,
            "host_gib": self.host_gib,
            "capacity_gib": self.capacity_gib,
            "headroom_gib": self.headroom_gib,
            "levers": self.levers,
        }

    def table(self) -> str:
        head = (
            f"{'component':<32}{'params M':>10}{'buffers M':>11}{'trained M':>11}{'weights':>9}{'grads':>8}"
            f"{'optim':>8}{'EMA':>8}"
        )
        lines = ["Static memory plan (GiB)", head]
        for c in self.components:
            lines.append(
                f"{c.name:<32}{c.params_m:>10.1f}{c.buffers_m:>11.1f}{c.trainable_m:>11.1f}{c.weights_gib:>9.3f}"
                f"{c.grads_gib:>8.3f}{c.optimizer_gib:>8.3f}{c.ema_gib:>8.3f}"
            )
        lines.append(
            f"static on the device: {self.device_gib:.3f} GiB; in host memory: {self.host_gib:.3f} GiB"
        )
        if self.capacity_gib is not None:
            lines.append(
                f"device memory {self.capacity_gib:.1f} GiB: {self.headroom_gib:.2f} GiB left for activations"
            )
        lines.append("levers: " + ", ".join(f"{k}={v}" for k, v in self.levers.items()))
        return "\n".join(lines)


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_components(
    parts: dict[str, nn.Module],
    optimizer_targets: dict[str, str],
    ema: dict[str, tuple[int, torch.dtype, str]] | None = None,
) -> tuple[list[ComponentMemory], float]:
    """Per component: weights (as stored), gradients (trained parameters, in their dtype), optimiser
    state (by `optimizer_targets[name]`) and EMA (`ema[name]` = (element count, dtype, placement)).
    The weights include the buffers. A parameter or buffer met in an earlier component is not counted
    again. Returns the rows and the GiB held in host memory."""
    seen: set[int] = set()
    rows, host = [], 0.0
    for name, module in parts.items():
        params = [p for p in module.parameters() if id(p) not in seen]
        buffers = [b for b in module.buffers() if id(b) not in seen]
        seen |= {id(t) for t in (*params, *buffers)}
        trained = [p for p in params if p.requires_grad]
        state = OPTIMIZER_STATE_BYTES.get(optimizer_targets.get(name, ""), 8.0) if trained else 0.0
        ema_gib = 0.0
        if ema and name in ema:
            count, dtype, placement = ema[name]
            size = count * torch.empty((), dtype=dtype).element_size() / GIB
            if placement == "cpu":
                host += size
            else:
                ema_gib = size
        rows.append(
            ComponentMemory(
                name=name,
                params_m=sum(p.numel() for p in params) / 1e6,
                buffers_m=sum(b.numel() for b in buffers) / 1e6,
                trainable_m=sum(p.numel() for p in trained) / 1e6,
                weights_gib=_bytes([*params, *buffers]) / GIB,
                grads_gib=_bytes(trained) / GIB,
                optimizer_gib=sum(p.numel() for p in trained) * state / GIB,
                ema_gib=ema_gib,
            )
        )
    return rows, host


def module_memory_plan(module, capacity_gib: float | None = None) -> MemoryPlan:
    """The plan of an AddSRModule as it is now (after the frozen parts were cast to the compute dtype)."""
    m = module.method
    memory = m["memory"]
    disc = module.discriminator
    heads = nn.ModuleList(
        [sub for name, sub in disc.named_children() if name not in ("backbone", "conditioner")]
    )
    # the denoiser's networks by name: "teacher UNet + ControlNet", "teacher transformer + ControlNet"
    networks = " + ".join(NETWORK_NAMES.get(n, n) for n in module.teacher.networks())
    parts = {
        "student (trained)": nn.ParameterList([p for _, p in module.student_trainable()]),
        "VAE": module.codec,  # before the denoisers, which hold it where the control is a latent
        f"teacher {networks}": module.teacher,
        "student (frozen, own)": module.student,  # what it does not share with the teacher
        "text encoder": module.conditioner.prompt_encoder,
        "tagger": module.conditioner.tagger or nn.Module(),
        "discriminator backbone": disc.backbone,
        "discriminator conditioner": disc.conditioner,
        "discriminator heads": heads,
    }
    targets = {
        "student (trained)": m["optimizer_g"]["_target_"],
        "discriminator heads": m["optimizer_d"]["_target_"],
    }
    ema_count = sum(p.numel() for _, p in module.student_trainable())
    ema = {"student (trained)": (ema_count, module.ema.dtype, module.ema.placement)}
    rows, host = plan_components(parts, targets, ema)
    # the plan's own settings are not levers (its choice is in the lever keys)
    levers = {k: v for k, v in memory.items() if k not in PLAN_SETTINGS} | {
        "optimizer_g": m["optimizer_g"]["_target_"],
        "frozen_dtype": str(next(module.teacher.parameters()).dtype).removeprefix("torch."),
    }
    return MemoryPlan(rows, sum(r.total_gib for r in rows), host, levers, capacity_gib)


def report_memory_plan(module) -> MemoryPlan:
    """Compute the plan of a module being set up by a Trainer, print it and log it with the hyperparameters."""
    capacity = None
    device = module.trainer.strategy.root_device
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory / GIB
    plan = module_memory_plan(module, capacity)
    if module.trainer.is_global_zero:
        log.info("\n%s", plan.table())
        for logger in module.trainer.loggers:
            logger.log_hyperparams({"memory_plan": plan.as_dict()})
    return plan
