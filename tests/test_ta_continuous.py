"""TA's continuous form gamma(t): the step weights at the student's timesteps, under DDPM and under rectified
flow (sigma mapped back to DDPM t by equal SNR), monotone between them."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf

from addsr_pl.config import ConfigError, validate
from addsr_pl.core.noise_schedule import DDPMSchedule, RectifiedFlowSchedule
from addsr_pl.method.losses import ta_continuous, ta_weights
from addsr_pl.method.module import AddSRModule
from addsr_pl.paths import config_dir

from conftest import to_dicts

SD2 = DDPMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)
METHOD = OmegaConf.to_container(OmegaConf.load(config_dir() / "method" / "addsr.yaml"))
STUDENT = torch.tensor(METHOD["student_timesteps"])  # the paper's DDPM timesteps, [999, 749, 499, 249]
SCHEDULES = ["exponential", "linear", "none", [3.0, 0.5, 2.0, 1.0]]


def step_weights(schedule):
    return ta_weights(schedule, len(STUDENT), **METHOD["ta"])


def gamma(t, schedule):
    return ta_continuous(t, STUDENT, step_weights(schedule), schedule, METHOD["ta"]["exponential"])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_at_the_student_timesteps_ddpm_gamma_is_the_step_weights(schedule):
    ddpm = DDPMSchedule(SD2.alphas_cumprod)
    assert torch.equal(gamma(ddpm.ddpm_time(STUDENT), schedule), step_weights(schedule))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_at_the_student_sigmas_flow_gamma_is_the_step_weights(schedule, shift):
    flow = RectifiedFlowSchedule(SD2.alphas_cumprod, shift=shift)
    sigmas = flow.from_ddpm(STUDENT)  # float32, as the module holds them: t back to about 1e-4
    assert sigmas.max() < 1
    torch.testing.assert_close(flow.ddpm_time(sigmas), STUDENT.double(), rtol=0, atol=1e-3)
    torch.testing.assert_close(
        gamma(flow.ddpm_time(sigmas), schedule), step_weights(schedule), rtol=1e-5, atol=0
    )


def test_flow_ddpm_time_inverts_from_ddpm_at_every_integer_timestep():
    flow = RectifiedFlowSchedule(SD2.alphas_cumprod, shift=3.0)
    t = torch.arange(1000)
    torch.testing.assert_close(flow.ddpm_time(flow.from_ddpm(t)), t.double(), rtol=0, atol=2e-2)


def test_between_the_student_timesteps_gamma_is_monotone_and_interpolates_the_step_weights():
    t = torch.linspace(0, 999, 4000, dtype=torch.float64)
    exponential = gamma(t, "exponential")
    # the paper's schedule grows with the step (0.5 * 2.1^(s-1)): gamma falls as t rises
    assert (exponential.diff() <= 0).all() and (exponential.diff() < 0).sum() > 3000
    # constant outside [t_n, t_1]: the weights of the last and first steps
    assert torch.equal(gamma(torch.tensor([0.0, 100.0]), "exponential"), step_weights("exponential")[[3, 3]])
    # half way between t_1 = 999 and t_2 = 749: the geometric mean of their weights
    w = step_weights("exponential")
    torch.testing.assert_close(gamma(torch.tensor([874.0]), "exponential"), (w[0] * w[1]).sqrt().view(1))
    # a list's weights joined by segments: a half and three quarters of the way from 0.5 (t_2) to 2.0 (t_3)
    torch.testing.assert_close(
        gamma(torch.tensor([624.0, 561.5]), SCHEDULES[3]), torch.tensor([1.25, 1.625], dtype=torch.float64)
    )


def test_flow_gamma_is_monotone_in_sigma():
    flow = RectifiedFlowSchedule(SD2.alphas_cumprod)
    sigma = torch.linspace(0.01, 0.99, 2000)
    weights = gamma(flow.ddpm_time(sigma), "exponential")
    assert (weights.diff() <= 0).all() and (weights.diff() < 0).sum() > 1000


@pytest.mark.parametrize("model", ["tiny", "sd3_tiny"])  # DDPM and rectified flow
def test_the_module_weights_each_graded_step_as_the_step_form_does(model, make_cfg):
    module = AddSRModule(**to_dicts(make_cfg([f"model={model}", "method.ta_form=continuous"])))
    assert module.method["ta_form"] == "continuous"
    n = len(module.student_timesteps)
    for k in range(1, n + 1):
        start = torch.arange(n - k + 1)  # every unroll of k steps
        unroll = SimpleNamespace(start=start, k=k)  # what ta_weight reads of an Unroll
        torch.testing.assert_close(module.ta_weight(unroll), module.ta[start + k - 1], rtol=1e-5, atol=0)
    assert module.ta_weight(unroll).dtype == module.ta.dtype


def test_the_continuous_form_refuses_the_official_indexing(make_cfg):
    validate(make_cfg(["method.ta_form=continuous"]))
    with pytest.raises(ConfigError, match="method.ta_form = 'continuous'.*ta_indexing=graded"):
        validate(make_cfg(["method.ta_form=continuous", "method.ta_indexing=official"]))
    with pytest.raises(ConfigError, match="method.ta_form"):
        validate(make_cfg(["method.ta_form=sigma"]))
