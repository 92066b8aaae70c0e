"""`method.memory.plan`: which memory levers and which per-GPU micro-batch a run uses.

`plan: auto` on one CUDA device picks, from the static memory plan and a short probe
(method/lever_probe.py: a few real iterations per lever combination at two micro-batches), the combination
with the most samples/s whose predicted peak fits `memory_cap`, keeping the configured effective batch
(`data.batch_size` x `method.accumulate_grad_batches`) as micro-batch x accumulation. A key a user set
(anything but `auto`) is never changed. `plan: manual`, a CPU run and a run over several processes take
`method.memory.manual`'s values for every key left `auto` (what the levers were before the plan existed).

The choice itself (`choose_levers`) is a pure function of the measurements, so the CPU tests give it
measurements as data.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

AUTO = "auto"
# The module's levers the plan may decide, each with the values it tries (the chunk: one call, or the
# manual chunk); the micro-batch is decided beside them.
PLAN_LEVERS = ("gradient_checkpointing", "vae_gradient_checkpointing", "teacher_decode_chunk")
MICRO_BATCH = "micro_batch"


class PlanError(ValueError):
    """No lever combination fits: the message names the cap, the batch and the fix."""


def manual_levers(memory: dict) -> dict:
    """`memory` with each lever left `auto` set to `memory["manual"]`'s value (the micro-batch is not a
    module lever: `manual_choice` and `plan_for_run` set it)."""
    return memory | {key: memory["manual"][key] for key in PLAN_LEVERS if memory.get(key) == AUTO}


def with_manual_levers(method: dict) -> dict:
    """`method` (not changed) with the module's `auto` levers resolved to the manual values."""
    if "manual" not in method["memory"]:  # a method group from before the plan existed
        return method
    return method | {"memory": manual_levers(method["memory"])}


def set_by_user(memory: dict) -> list[str]:
    """The plan's keys the user set (anything but `auto`): never changed by the plan."""
    return [key for key in (*PLAN_LEVERS, MICRO_BATCH) if memory[key] != AUTO]


def divisors(n: int) -> list[int]:
    return [b for b in range(1, n + 1) if n % b == 0]


def effective_batch(batch_size: int, accumulate: int) -> int:
    return batch_size * accumulate


def check_micro_batch(micro_batch, effective: int) -> None:
    if micro_batch != AUTO and effective % int(micro_batch):
        raise PlanError(
            f"method.memory.micro_batch = {micro_batch}: must divide the effective batch "
            f"data.batch_size x method.accumulate_grad_batches = {effective} ({divisors(effective)}), or be auto"
        )


def lever_candidates(memory: dict) -> list[dict]:
    """Every combination of the levers left `auto` (a set one keeps its value), the fastest first."""
    options = {
        "gradient_checkpointing": [False, True],
        "vae_gradient_checkpointing": [False, True],
        "teacher_decode_chunk": [None, memory["manual"]["teacher_decode_chunk"]],
    }
    keys = [[memory[k]] if memory[k] != AUTO else list(dict.fromkeys(options[k])) for k in PLAN_LEVERS]
    return [dict(zip(PLAN_LEVERS, values)) for values in itertools.product(*keys)]


def probe_micro_batches(effective: int, micro_batch) -> list[int]:
    """The micro-batches the probe measures: the set one, else the two smallest divisors of the effective
    batch (the others are predicted from the line through these two)."""
    if micro_batch != AUTO:
        return [int(micro_batch)]
    return divisors(effective)[:2]


@dataclass(frozen=True)
class Measurement:
    """One probe point: the lever combination at a micro-batch; peak and time inf when it ran out of memory."""

    levers: dict
    micro_batch: int
    peak_gib: float
    seconds: float  # per micro-batch (one training step)

    @property
    def key(self) -> tuple:
        return tuple(self.levers[k] for k in PLAN_LEVERS)


@dataclass
class LeverChoice:
    levers: dict  # PLAN_LEVERS -> value
    micro_batch: int
    accumulate: int
    predicted_peak_gib: float | None
    static_gib: float | None
    cap_gib: float | None
    samples_per_s: float | None
    set_by_user: list[str] = field(default_factory=list)
    reasons: dict = field(default_factory=dict)
    mode: str = "auto"  # auto | auto, kept from the checkpoint | manual | cpu | several processes

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "levers": self.levers,
            "micro_batch": self.micro_batch,
            "accumulate_grad_batches": self.accumulate,
            "predicted_peak_gib": self.predicted_peak_gib,
            "static_gib": self.static_gib,
            "cap_gib": self.cap_gib,
            "samples_per_s": self.samples_per_s,
            "set_by_user": self.set_by_user,
            "reasons": self.reasons,
        }

    @classmethod
    def from_dict(cls, saved: dict) -> LeverChoice:
        """The choice `as_dict` wrote (a checkpoint's run config keeps it)."""
        return cls(
            dict(saved["levers"]),
            saved["micro_batch"],
            saved["accumulate_grad_batches"],
            saved["predicted_peak_gib"],
            saved["static_gib"],
            saved["cap_gib"],
            saved["samples_per_s"],
            list(saved["set_by_user"]),
            dict(saved["reasons"]),
            saved["mode"],
        )

    def summary(self) -> str:
        return f"{describe(self.levers)}, micro-batch {self.micro_batch} x accumulation {self.accumulate}"

    def table(self) -> str:
        head = f"Lever plan (method.memory.plan={self.mode})"
        if self.cap_gib is not None:
            head += f", cap {self.cap_gib:.1f} GiB"
        lines = [head]
        values = dict(self.levers) | {"micro-batch x accumulation": f"{self.micro_batch} x {self.accumulate}"}
        for key, value in values.items():
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            why = self.reasons.get(key, "")
            lines.append(f"  {key:<28}{shown:<8}{why}")
        if self.predicted_peak_gib is not None:
            lines.append(
                f"  predicted peak {self.predicted_peak_gib:.2f} GiB (static {self.static_gib:.2f} GiB + "
                f"activations), {self.samples_per_s:.2f} samples/s predicted"
            )
        return "\n".join(lines)


def _line(points: list[tuple[int, float]], b: int) -> float:
    """The least-squares line through (micro-batch, value) points, at `b`."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y + slope * (b - mean_x)


def predict(points: list[Measurement], b: int) -> tuple[float, float] | None:
    """(peak GiB, seconds) of one lever combination at micro-batch `b`: the measurement at `b`,
    inf where a micro-batch up to `b` ran out of memory, else the line through the finite points (peak
    and time grow linearly with the batch); None where fewer than two micro-batches were measured."""
    at_b = [m for m in points if m.micro_batch == b]
    if at_b:
        return at_b[0].peak_gib, at_b[0].seconds
    if any(math.isinf(m.peak_gib) and m.micro_batch <= b for m in points):
        return math.inf, math.inf
    finite = [m for m in points if not math.isinf(m.peak_gib)]
    if len({m.micro_batch for m in finite}) < 2:
        return None
    peak = _line([(m.micro_batch, m.peak_gib) for m in finite], b)
    seconds = _line([(m.micro_batch, m.seconds) for m in finite], b)
    return peak, max(seconds, 1e-9)


def describe(levers: dict) -> str:
    return ", ".join(f"{k}={'null' if v is None else str(v).lower()}" for k, v in levers.items())


def choose_levers(
    measurements: list[Measurement],
    static_gib: float,
    cap_gib: float,
    margin_gib: float,
    effective: int,
    micro_batch,
    set_by_user: list[str],
) -> LeverChoice:
    """The lever combination and micro-batch (a divisor of `effective`, or the set `micro_batch`) with the
    most samples/s whose peak, measured or predicted, stays within `cap_gib - margin_gib`; among equals,
    the one with the lower peak. Raises PlanError when none fits."""
    budget = cap_gib - margin_gib
    groups: dict[tuple, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.key, []).append(m)
    batches = divisors(effective) if micro_batch == AUTO else [int(micro_batch)]
    options = []  # (samples/s, -peak, levers, b, peak)
    for key, points in groups.items():
        for b in batches:
            predicted = predict(points, b)
            if predicted is None:
                continue
            peak, seconds = predicted
            options.append((b / seconds, -peak, key, b, peak))
    fitting = [o for o in options if o[4] <= budget]
    if not fitting:
        leanest = min(options, key=lambda o: (o[4], o[3]), default=None)
        needs = (
            f"the leanest ({describe(dict(zip(PLAN_LEVERS, leanest[2])))} at micro-batch {leanest[3]}) "
            f"needs {leanest[4]:.2f} GiB"
            if leanest and not math.isinf(leanest[4])
            else "every combination ran out of memory"
        )
        fixed = f" (set by you: {', '.join(set_by_user)}; auto lets the plan choose)" if set_by_user else ""
        raise PlanError(
            f"method.memory.plan=auto: no lever combination fits method.memory.memory_cap = {cap_gib:.1f} GiB "
            f"less the margin {margin_gib:.1f} GiB; {needs}{fixed}. Raise method.memory.memory_cap (null: the "
            "device's memory), lower the static memory (method.memory.ema_placement=cpu, 8-bit AdamW) or the "
            "crop (data.crop_size), or set the levers yourself with method.memory.plan=manual."
        )
    rate, _, key, b, peak = max(fitting, key=lambda o: o[:2])  # the rate, then the lower peak
    levers = dict(zip(PLAN_LEVERS, key))
    reasons = explain(levers, b, groups, budget, set_by_user)
    reasons["micro-batch x accumulation"] = (
        "set by you"
        if MICRO_BATCH in set_by_user
        else f"the most samples/s within {budget:.1f} GiB, effective batch {effective} kept"
    )
    return LeverChoice(
        levers, b, effective // b, peak, static_gib, cap_gib, rate, set_by_user, reasons, "auto"
    )


def explain(levers: dict, b: int, groups: dict, budget: float, set_by_user: list[str]) -> dict:
    """Per lever: set by you, or why the plan took its value (the other value, the rest unchanged, would
    not fit at this micro-batch, or is slower)."""
    chosen = tuple(levers[k] for k in PLAN_LEVERS)
    reasons = {}
    for i, key in enumerate(PLAN_LEVERS):
        if key in set_by_user:
            reasons[key] = "set by you"
            continue
        flipped = [
            g
            for g in groups
            if g[i] != chosen[i] and all(g[j] == chosen[j] for j in range(len(chosen)) if j != i)
        ]
        predicted = predict(groups[flipped[0]], b) if flipped else None
        if predicted is None:
            reasons[key] = "the only value probed"
        elif predicted[0] > budget:
            reasons[key] = f"the other value needs {predicted[0]:.1f} GiB here"
        else:
            reasons[key] = "fits, and the other value is slower"
    return reasons


def manual_choice(memory: dict, batch_size: int, accumulate: int, mode: str) -> LeverChoice:
    """The configured values (`manual` for each lever left auto; the micro-batch as set, else the batch)."""
    levers = {k: manual_levers(memory)[k] for k in PLAN_LEVERS}
    user = set_by_user(memory)
    effective = effective_batch(batch_size, accumulate)
    b = batch_size if memory[MICRO_BATCH] == AUTO else int(memory[MICRO_BATCH])
    reasons = {k: "set by you" if k in user else "method.memory.manual" for k in PLAN_LEVERS}
    reasons["micro-batch x accumulation"] = "set by you" if MICRO_BATCH in user else "as configured"
    return LeverChoice(levers, b, effective // b, None, None, None, None, user, reasons, mode)
