"""AddSR's losses: distillation weighted by c(t) and the timestep-adapting (TA) weight, hinge GAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from addsr_pl.core.noise_schedule import position_in_decreasing

TA_SCHEDULES = ("exponential", "linear", "none")
TA_INDEXING = ("graded", "official")
# step: gamma per student step index (the paper's); continuous: gamma(t) of the graded step's timestep
TA_FORMS = ("step", "continuous")


def ta_weights(schedule, n_steps: int, exponential: dict, linear: dict) -> Tensor:
    """The TA weight gamma of each student step s = 1..n_steps (paper Eq. 5), float64.

    `exponential`: base * ratio^(s-1) (official: 0.5 * 2.1^(s-1)); `linear`: slope * s + intercept
    (official's earlier form 0.2 s + 0.5); `none`: 1; a list gives the weights directly.
    """
    s = torch.arange(1, n_steps + 1, dtype=torch.float64)
    if isinstance(schedule, str):
        if schedule == "exponential":
            return exponential["base"] * torch.pow(
                torch.tensor(exponential["ratio"], dtype=torch.float64), s - 1
            )
        if schedule == "linear":
            return linear["slope"] * s + linear["intercept"]
        if schedule == "none":
            return torch.ones(n_steps, dtype=torch.float64)
        raise ValueError(
            f"method.ta_schedule = {schedule!r}: must be one of {TA_SCHEDULES} or a list of weights"
        )
    weights = torch.tensor([float(w) for w in schedule], dtype=torch.float64)
    if len(weights) != n_steps:
        raise ValueError(
            f"method.ta_schedule has {len(weights)} weights: a list needs one per student timestep ({n_steps})"
        )
    return weights


def ta_step_index(graded: Tensor, start: Tensor, k: int, n_steps: int, indexing: str) -> Tensor:
    """0-based index into the TA weights for each sample.

    `graded` (the paper: gamma falls as the timestep rises): the index of the graded (last) step.
    `official` (the official code): the index of the unroll's first step when k >= 2, and the last
    index for a single step (its t_TA = 1000 falls in the "otherwise" branch).
    """
    if indexing == "graded":
        return graded
    if indexing == "official":
        return start if k >= 2 else torch.full_like(graded, n_steps - 1)
    raise ValueError(f"method.ta_indexing = {indexing!r}: must be one of {TA_INDEXING}")


def ta_continuous(
    t: Tensor, student_timesteps: Tensor, weights: Tensor, schedule, exponential: dict
) -> Tensor:
    """The TA weight as a function gamma(t) of DDPM timesteps t (floats, any value), in `weights`' dtype.

    `weights`: the step form's (`ta_weights` of `schedule`), one per student DDPM timestep t_1 > ... > t_n
    (`student_timesteps`), on t's device. A step position s(t) runs piecewise linearly through (t_s, s),
    clamped to [1, n] outside them, and gamma is the schedule at s: base * ratio^(s-1) for `exponential`
    (geometric between steps), the weights joined by segments otherwise (`linear`'s own line, a list's
    polyline). At t = t_s, gamma is the weight of step s.
    """
    if len(weights) == 1:
        return weights.expand(t.shape).clone()
    position = position_in_decreasing(t.double(), student_timesteps.double(), first=1)
    if schedule == "exponential":
        return (exponential["base"] * exponential["ratio"] ** (position - 1)).to(weights.dtype)
    low = position.floor().long().clamp(1, len(weights) - 1)  # the step at or before s (1-based)
    frac = (position - low).to(weights.dtype)
    return weights[low - 1] + (weights[low] - weights[low - 1]) * frac


def distillation_loss(student_x0: Tensor, teacher_x0: Tensor, c_t: Tensor) -> Tensor:
    """Per-sample distillation loss, [B].

    student_x0: [B, ...]; teacher_x0: [B * n, ...] (n teacher timesteps per sample, sample-major);
    c_t: [B * n], the weight c(t) of each teacher timestep (`NoiseSchedule.distillation_weight`: DDPM
    sqrt(alpha_bar_t)); each squared error is averaged over its elements, weighted by its c(t), then
    averaged over the n timesteps.
    """
    b = student_x0.shape[0]
    n = teacher_x0.shape[0] // b
    student = student_x0.float().repeat_interleave(n, dim=0)
    err = F.mse_loss(student, teacher_x0.float().detach(), reduction="none").flatten(1).mean(1)
    return (c_t.to(err.device) * err).view(b, n).mean(1)


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Adversarial loss of the student: -mean D(fake)."""
    return -fake_logits.float().mean()


def discriminator_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss of D: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def sample_unroll(
    k_probs: Tensor, n_steps: int, batch: int, start_mode: str, generator: torch.Generator
) -> tuple[int, Tensor]:
    """Draw the unroll length k (one per batch) and each sample's first step index.

    k = 1 always runs the first student timestep (the one-step sampler); for k >= 2 the unroll
    starts at a random index in [0, n_steps - k] per sample (`random`, official) or at 0 (`first`).
    """
    k = int(torch.multinomial(k_probs, 1, generator=generator).item()) + 1
    if k == 1 or start_mode == "first":
        return k, torch.zeros(batch, dtype=torch.long)
    if start_mode != "random":
        raise ValueError(f"method.unroll_start = {start_mode!r}: must be 'random' or 'first'")
    return k, torch.randint(0, n_steps - k + 1, (batch,), generator=generator)
