"""The noise schedule: how a clean latent is noised, how x0 comes back from the model's prediction, and
what the sampler and the losses read at a timestep, behind one interface.

The paper's is `DDPMSchedule` (Stable Diffusion 2's variance-preserving schedule, Eq. 1 and Eq. 4).
`RectifiedFlowSchedule` is the flow-matching form of SD3 and FLUX.1; AddSR on it is a mapping of this
project's (docs/method.md): its student timesteps are the DDPM ones at equal signal-to-noise ratio.

A timestep `t` is the schedule's own, one per sample: DDPM an integer index into alpha_bar, rectified
flow the noise level sigma in (0, 1). `model_timestep(t)` is what the network is fed. Every formula runs
in fp32 (or wider) whatever the inputs' dtype or autocast.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

# What a DDPM model predicts (the scheduler config's `prediction_type`, diffusers' three): SD2-base the
# noise, SD2-768 (and models trained that way) the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0,
# a `sample` model x0 itself.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# A rectified-flow model predicts the velocity v = eps - x0 (diffusers' flow-matching training scripts).
FLOW_PREDICTION = "flow_velocity"


def _exact_dtype(x: Tensor) -> torch.dtype:
    """At least fp32: Eq. 4 divides by sqrt(alpha_bar_999) ~ 0.068, which magnifies bf16 rounding ~15x."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """One value per sample shaped to broadcast over a [B, ...] tensor of `ndim` dimensions."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def position_in_decreasing(values: Tensor, table: Tensor, first: int = 0) -> Tensor:
    """Where `values` fall in `table` (n >= 2 entries, strictly decreasing) as a continuous position:
    `first + i` at `table[i]`, linear between entries, clamped to [first, first + n - 1]."""
    n = len(table)
    ascending = table.flip(0)  # ascending[j] is table[n - 1 - j]
    right = torch.searchsorted(ascending, values).clamp(1, n - 1)
    low, high = ascending[right - 1], ascending[right]
    frac = ((values - low) / (high - low)).clamp(0, 1)
    return (first + n - 1 - (right - 1)) - frac  # position of ascending[right - 1], less the way to the next


def ddpm_student_timesteps(n: int, num_train_timesteps: int) -> list[int]:
    """n timesteps evenly spaced down from T - 1: AddSR's [999, 749, 499, 249] for n = 4, T = 1000."""
    return [num_train_timesteps - 1 - (i * num_train_timesteps) // n for i in range(n)]


def equal_snr_sigma(alpha_bar: Tensor) -> Tensor:
    """The flow noise level whose SNR ((1 - sigma) / sigma)^2 is the DDPM one, alpha_bar / (1 - alpha_bar):
    sigma = sqrt(1 - alpha_bar) / (sqrt(alpha_bar) + sqrt(1 - alpha_bar)). Below 1 for any alpha_bar > 0."""
    alpha_bar = alpha_bar.double()
    return (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def time_shift(sigma: Tensor, shift: float) -> Tensor:
    """diffusers' FlowMatchEulerDiscreteScheduler's shift: shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class NoiseSchedule(ABC, nn.Module):
    """The forward process and what the sampler and the losses need of it (a module, so that its tables
    follow the model to its device)."""

    prediction_type: str

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t: x0 noised to timestep t (Eq. 1)."""

    @abstractmethod
    def predict_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """x0 from the model's prediction at (x_t, t) (Eq. 4)."""

    @abstractmethod
    def implied_noise(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """The noise that, with the predicted x0, makes x_t: what DDIM's deterministic sampler re-noises with."""

    @abstractmethod
    def prediction_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model should predict for x_t = add_noise(x0, noise, t) (the teacher's loss, Eq. 2)."""

    @abstractmethod
    def distillation_weight(self, t: Tensor) -> Tensor:
        """c(t) of the distillation loss at the teacher's timesteps, float32."""

    @abstractmethod
    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep the network is fed for the schedule's t."""

    @abstractmethod
    def from_ddpm(self, t: Tensor) -> Tensor:
        """The schedule's timesteps for DDPM integer timesteps (the config's `student_timesteps` and
        `teacher_timestep_range` are DDPM's, the paper's): the same timesteps, or their equal-SNR form."""

    @abstractmethod
    def ddpm_time(self, t: Tensor) -> Tensor:
        """The DDPM timestep of the schedule's timesteps, continuous (float64): `from_ddpm`'s inverse."""

    @abstractmethod
    def student_timesteps(self, n: int) -> list:
        """The default student timesteps of an n-step sampler, strictly decreasing."""

    @abstractmethod
    def check_timesteps(self, timesteps: list) -> None:
        """ValueError (one line) unless `timesteps` are strictly decreasing timesteps of this schedule."""


class DDPMSchedule(NoiseSchedule):
    """Stable Diffusion 2's variance-preserving schedule: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
    t an integer in [0, T), fed to the network as it is; the model predicts eps, v or x0."""

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type = {prediction_type!r}: must be one of {', '.join(PREDICTION_TYPES)}"
            )
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone().float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _alpha_bar(self, t: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
        return _per_sample(self.alphas_cumprod.to(t.device)[t], ndim).to(dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Eq. 1: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        dtype = _exact_dtype(x0)
        alpha_bar = self._alpha_bar(t, x0.ndim, dtype)
        return alpha_bar.sqrt() * x0.to(dtype) + (1 - alpha_bar).sqrt() * noise.to(dtype)

    def predict_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """Epsilon: Eq. 4, x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t). v:
        x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v, which does not divide the prediction's error
        by sqrt(alpha_bar_t) (about 0.07 at t = 999). Sample: the prediction is x0."""
        dtype = _exact_dtype(x_t)
        alpha_bar = self._alpha_bar(t, x_t.ndim, dtype)
        x_t, prediction = x_t.to(dtype), prediction.to(dtype)
        if self.prediction_type == "sample":
            return prediction
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * prediction
        return (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()

    def implied_noise(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """(x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t), x0 predicted."""
        x0 = self.predict_x0(x_t, prediction, t)
        dtype = _exact_dtype(x_t)
        alpha_bar = self._alpha_bar(t, x_t.ndim, dtype)
        return (x_t.to(dtype) - alpha_bar.sqrt() * x0.to(dtype)) / (1 - alpha_bar).sqrt()

    def prediction_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The noise (Eq. 2), v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0, or x0."""
        dtype = _exact_dtype(x0)
        if self.prediction_type == "sample":
            return x0.to(dtype)
        if self.prediction_type == "v_prediction":
            alpha_bar = self._alpha_bar(t, x0.ndim, dtype)
            return alpha_bar.sqrt() * noise.to(dtype) - (1 - alpha_bar).sqrt() * x0.to(dtype)
        return noise.to(dtype)

    def distillation_weight(self, t: Tensor) -> Tensor:
        """c(t) = sqrt(alpha_bar_t) (the official code's weighting)."""
        return self.alphas_cumprod.to(t.device)[t].float().sqrt()

    def model_timestep(self, t: Tensor) -> Tensor:
        return t

    def from_ddpm(self, t: Tensor) -> Tensor:
        return t

    def ddpm_time(self, t: Tensor) -> Tensor:
        return t.double()

    def student_timesteps(self, n: int) -> list[int]:
        return ddpm_student_timesteps(n, self.num_train_timesteps)

    def check_timesteps(self, timesteps: list) -> None:
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or not all(
            0 <= t < self.num_train_timesteps for t in timesteps
        ):
            raise ValueError(
                f"timesteps {timesteps}: must be strictly decreasing and in [0, {self.num_train_timesteps})"
            )


class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified flow (SD3, FLUX.1): x_t = (1 - sigma) x0 + sigma eps, the model predicting the velocity
    v = eps - x0, so x0 = x_t - sigma v (no division) and eps = x_t + (1 - sigma) v. The network is fed
    sigma * T, as diffusers' FlowMatchEulerDiscreteScheduler feeds its timesteps.

    Args:
        reference_alphas_cumprod: the DDPM schedule (SD2's) whose student timesteps `student_timesteps`
            maps by equal SNR.
        shift: the time shift applied to those equal-SNR sigmas (1: none), as the backbone's scheduler
            shifts its own; pinned here, never derived from the image's resolution.
        num_train_timesteps: T of the model timestep sigma * T.
    """

    prediction_type = FLOW_PREDICTION

    def __init__(self, reference_alphas_cumprod: Tensor, shift: float = 1.0, num_train_timesteps: int = 1000):
        super().__init__()
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift = {shift}: must be a positive number")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self.register_buffer(
            "reference_alphas_cumprod", reference_alphas_cumprod.clone().float(), persistent=False
        )

    @staticmethod
    def _sigma(t: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
        return _per_sample(t, ndim).to(dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        dtype = _exact_dtype(x0)
        sigma = self._sigma(t, x0.ndim, dtype)
        return (1 - sigma) * x0.to(dtype) + sigma * noise.to(dtype)

    def predict_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        dtype = _exact_dtype(x_t)
        return x_t.to(dtype) - self._sigma(t, x_t.ndim, dtype) * prediction.to(dtype)

    def implied_noise(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        dtype = _exact_dtype(x_t)
        return x_t.to(dtype) + (1 - self._sigma(t, x_t.ndim, dtype)) * prediction.to(dtype)

    def prediction_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        dtype = _exact_dtype(x0)
        return noise.to(dtype) - x0.to(dtype)

    def distillation_weight(self, t: Tensor) -> Tensor:
        """sqrt(alpha_bar) at equal SNR: (1 - sigma) / sqrt((1 - sigma)^2 + sigma^2)."""
        sigma = t.double()
        return ((1 - sigma) / ((1 - sigma) ** 2 + sigma**2).sqrt()).float()

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def from_ddpm(self, t: Tensor) -> Tensor:
        """sigma at the SNR of the reference schedule's alpha_bar_t, shifted by `shift`; float32."""
        alpha_bar = self.reference_alphas_cumprod.to(t.device)[t.long()]
        return time_shift(equal_snr_sigma(alpha_bar), self.shift).float()

    def ddpm_time(self, t: Tensor) -> Tensor:
        """The DDPM t of sigma's SNR: the shift undone, alpha_bar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2),
        and t where the reference alpha_bar, taken linear between its integer timesteps, equals it
        (clamped to [0, T - 1])."""
        sigma = t.double()
        sigma = sigma / (self.shift - (self.shift - 1) * sigma)  # time_shift's inverse
        alpha_bar = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
        table = self.reference_alphas_cumprod.to(t.device, torch.float64)  # decreasing in t
        return position_in_decreasing(alpha_bar, table)

    def student_timesteps(self, n: int) -> list[float]:
        """The DDPM defaults (`ddpm_student_timesteps` of the reference schedule) at equal SNR, shifted by
        `shift`: below 1, since sigma = 1 would discard the LR latent the first step starts from."""
        ddpm = ddpm_student_timesteps(n, len(self.reference_alphas_cumprod))
        sigma = time_shift(equal_snr_sigma(self.reference_alphas_cumprod[ddpm]), self.shift)
        return sigma.tolist()

    def check_timesteps(self, timesteps: list) -> None:
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or not all(0 < s < 1 for s in timesteps):
            raise ValueError(f"timesteps {timesteps}: must be strictly decreasing noise levels in (0, 1)")


def noise_schedule_from(scheduler, stage: str, reference=None, shift: float = 1.0) -> NoiseSchedule:
    """The schedule of a diffusers scheduler: DDPMScheduler / DDIMScheduler -> `DDPMSchedule`,
    FlowMatchEulerDiscreteScheduler -> `RectifiedFlowSchedule`; a one-line ValueError for anything else.

    reference: the DDPM scheduler whose student timesteps a flow schedule maps (SD2's); shift: the flow
    schedule's time shift of those equal-SNR sigmas (1: none). It is never the scheduler's own: SD3's
    static shift (3.0) would move the student's noise levels off equal SNR, and FLUX's depends on the image
    size, which the student's timesteps must not.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    name = type(scheduler).__name__
    if isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        prediction = scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"The {stage} stage needs an epsilon-, v- or sample-prediction model, but the scheduler's "
                f"prediction_type is {prediction!r}. Set model.components.scheduler.prediction_type to what the "
                f"UNet was trained for: one of {', '.join(PREDICTION_TYPES)}."
            )
        return DDPMSchedule(scheduler.alphas_cumprod, prediction)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if reference is None:
            raise ValueError(
                f"The {stage} stage's rectified-flow schedule needs the DDPM scheduler whose student "
                "timesteps it maps by equal SNR (reference=): give SD2's"
            )
        return RectifiedFlowSchedule(reference.alphas_cumprod, shift, scheduler.config.num_train_timesteps)
    raise ValueError(
        f"The {stage} stage cannot use a {name}: the noise schedules here are DDPMScheduler or DDIMScheduler "
        "(DDPM) and FlowMatchEulerDiscreteScheduler (rectified flow)"
    )
