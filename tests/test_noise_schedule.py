"""The noise-schedule interface: rectified flow checked against diffusers' FlowMatchEulerDiscreteScheduler
and against the DDPM schedule at equal SNR, the builder's choice and errors, and the student sampler run
end to end on a flow schedule with the tiny student's networks."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from omegaconf import OmegaConf

from addsr_pl.core.noise_schedule import (
    DDPMSchedule,
    RectifiedFlowSchedule,
    equal_snr_sigma,
    noise_schedule_from,
    time_shift,
)
from addsr_pl.core.sampler import sample_student
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.paths import config_dir

# SD2-base's schedule as the tiny preset pins it, and AddSR's student timesteps
SD2 = DDPMScheduler(
    **OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml").components.scheduler)
)
ADDSR_TIMESTEPS = list(OmegaConf.load(config_dir() / "method" / "addsr.yaml").student_timesteps)


def draws(shape=(3, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def flow():
    return RectifiedFlowSchedule(SD2.alphas_cumprod)


def test_x0_and_the_noise_come_back_exactly_from_the_true_velocity(flow):
    x0, eps = draws()
    sigma = torch.tensor([0.95, 0.5, 0.05])
    x_t = flow.add_noise(x0, eps, sigma)
    v = flow.prediction_target(x0, eps, sigma)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(flow.predict_x0(x_t, v, sigma), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.implied_noise(x_t, v, sigma), eps, atol=1e-6, rtol=0)


def test_noising_and_renoising_are_diffusers_flow_matching_steps(flow):
    """add_noise is FlowMatchEulerDiscreteScheduler.scale_noise; fresh re-noising of the predicted x0 is its
    stochastic step; re-noising with the implied noise (DDIM) is its Euler step; the network is fed its
    timesteps, 1000 sigma."""
    x_t, v = draws((1, 4, 8, 8))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    sigma, sigma_next = torch.tensor([0.8]), torch.tensor([0.6])
    diffusers_flow = FlowMatchEulerDiscreteScheduler()
    diffusers_flow.set_timesteps(sigmas=[0.8, 0.6])
    torch.testing.assert_close(flow.model_timestep(sigma), diffusers_flow.timesteps[:1])
    torch.testing.assert_close(
        flow.add_noise(x_t, noise, sigma), diffusers_flow.scale_noise(x_t, flow.model_timestep(sigma), noise)
    )
    x0 = flow.predict_x0(x_t, v, sigma)
    euler = diffusers_flow.step(v, diffusers_flow.timesteps[0], x_t).prev_sample
    torch.testing.assert_close(flow.add_noise(x0, flow.implied_noise(x_t, v, sigma), sigma_next), euler)
    stochastic = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    stochastic.set_timesteps(sigmas=[0.8, 0.6])
    step = stochastic.step(v, stochastic.timesteps[0], x_t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flow.add_noise(x0, noise, sigma_next), step.prev_sample)


def test_the_default_student_timesteps_are_addsrs_and_their_equal_snr_sigmas(flow):
    ddpm = DDPMSchedule(SD2.alphas_cumprod)
    assert ddpm.student_timesteps(4) == ADDSR_TIMESTEPS
    sigma = torch.tensor(flow.student_timesteps(4), dtype=torch.float64)
    alpha_bar = SD2.alphas_cumprod[ADDSR_TIMESTEPS].double()
    torch.testing.assert_close(((1 - sigma) / sigma) ** 2, alpha_bar / (1 - alpha_bar), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        sigma, torch.tensor([0.936, 0.803, 0.617, 0.409], dtype=torch.float64), atol=5e-4, rtol=0
    )
    # the distillation weight c(t) is sqrt(alpha_bar) at the same SNR
    torch.testing.assert_close(
        flow.distillation_weight(sigma.float()), ddpm.distillation_weight(torch.tensor(ADDSR_TIMESTEPS))
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_no_default_student_timestep_reaches_sigma_1_which_discards_the_lr_latent(shift):
    flow = RectifiedFlowSchedule(SD2.alphas_cumprod, shift)
    for n in range(1, 5):
        sigma = flow.student_timesteps(n)
        assert all(0 < s < 1 for s in sigma), (n, sigma)
        flow.check_timesteps(sigma)
    assert equal_snr_sigma(SD2.alphas_cumprod[-1:]).item() < 1


def test_the_pinned_shift_moves_the_student_sigmas_as_diffusers_shifts_its_own():
    unshifted, diffusers_shifted = (FlowMatchEulerDiscreteScheduler(shift=shift) for shift in (1.0, 3.0))
    torch.testing.assert_close(time_shift(unshifted.sigmas, 3.0), diffusers_shifted.sigmas)
    plain, shifted = (RectifiedFlowSchedule(SD2.alphas_cumprod, shift) for shift in (1.0, 3.0))
    expected = time_shift(torch.tensor(plain.student_timesteps(4), dtype=torch.float64), 3.0)
    torch.testing.assert_close(torch.tensor(shifted.student_timesteps(4), dtype=torch.float64), expected)
    assert all(a > b for a, b in zip(shifted.student_timesteps(4), plain.student_timesteps(4)))


def test_the_builder_takes_ddpm_ddim_and_flow_schedulers_and_names_what_it_refuses():
    assert isinstance(noise_schedule_from(SD2, "AddSR"), DDPMSchedule)
    ddim = noise_schedule_from(DDIMScheduler(prediction_type="v_prediction"), "AddSR")
    assert isinstance(ddim, DDPMSchedule) and ddim.prediction_type == "v_prediction"
    # the backbone's own shift (SD3's static 3.0, FLUX's by image size) never moves the student's sigmas
    for backbone in (
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
    ):
        flow = noise_schedule_from(backbone, "AddSR", reference=SD2)
        assert isinstance(flow, RectifiedFlowSchedule) and flow.shift == 1.0
    assert noise_schedule_from(backbone, "AddSR", reference=SD2, shift=3.0).shift == 3.0
    refusals = [
        (FlowMatchEulerDiscreteScheduler(), None, "needs the DDPM scheduler"),
        (
            EulerDiscreteScheduler(),
            SD2,
            "cannot use a EulerDiscreteScheduler: .*FlowMatchEulerDiscreteScheduler",
        ),
    ]
    for scheduler, reference, message in refusals:
        with pytest.raises(ValueError, match=message) as error:
            noise_schedule_from(scheduler, "AddSR", reference=reference)
        assert "\n" not in str(error.value)


def test_the_sampler_runs_a_flow_schedule_end_to_end(tiny_student, sample_pair, flow):
    """Four PSR steps of the tiny student's networks on the flow schedule: each step's network sees
    1000 sigma, x0 is z_t - sigma v, step 1 noises the LR latent and the later ones re-noise their x0
    (fresh) or take the Euler step (ddim)."""
    pipeline = AddSRPipeline.from_folder(tiny_student)
    _, lr = sample_pair
    lr_up, text_embeds, representation, _, _, _ = pipeline._inputs(lr, 4, None, None)
    sigmas = torch.tensor(flow.student_timesteps(4))
    start = pipeline.codec.encode(lr_up)
    noises = [torch.randn(start.shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    fed = []
    pipeline.denoiser.unet.register_forward_pre_hook(lambda _, args: fed.append(args[1].clone()))
    for renoise in ("fresh", "ddim"):
        fed.clear()
        with torch.no_grad():
            steps = sample_student(
                pipeline.denoiser, pipeline.codec, lr_up=lr_up, text_embeds=text_embeds,
                represent=pipeline.conditioner.represent, timesteps=sigmas, noises=noises, noise_schedule=flow,
                start_latent=start, psr=True, psr_weight=0.4, first_representation=representation,
                renoise=renoise)  # fmt: skip
        assert len(steps) == 4 and steps[-1].x0_image.shape == (1, 3, 64, 64)
        assert torch.isfinite(steps[-1].x0_image).all()
        torch.testing.assert_close(torch.stack(fed).flatten(), 1000 * sigmas)
        torch.testing.assert_close(steps[0].z_t, (1 - sigmas[0]) * start + sigmas[0] * noises[0])
        for i, step in enumerate(steps):
            torch.testing.assert_close(step.x0_latent, step.z_t - sigmas[i] * step.prediction)
        for i, (before, after) in enumerate(zip(steps, steps[1:]), start=1):
            if renoise == "fresh":
                expected = (1 - sigmas[i]) * before.x0_latent + sigmas[i] * noises[i]
            else:
                expected = before.z_t + (sigmas[i] - sigmas[i - 1]) * before.prediction
            torch.testing.assert_close(after.z_t, expected, atol=1e-5, rtol=1e-5)
