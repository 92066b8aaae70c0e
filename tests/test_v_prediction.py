"""v-prediction models (SD2-768's parameterisation): x0 and the teacher's target from v, and the whole
teacher -> student -> pipeline chain reading the prediction type from the scheduler."""

import pytest
import torch
from diffusers import DDPMScheduler

from addsr_pl.core.noise_schedule import DDPMSchedule
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.method.teacher import TeacherModule
from addsr_pl.train import train

from conftest import to_dicts

V = "model.components.scheduler.prediction_type=v_prediction"
FAST = ["data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0", "trainer.max_steps=1"]
ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_from_the_exact_target_is_the_clean_latent(prediction_type):
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 749, 250, 1])
    schedule = DDPMSchedule(ALPHAS, prediction_type)
    z_t = schedule.add_noise(z0, noise, t)
    target = schedule.prediction_target(z0, noise, t)
    torch.testing.assert_close(schedule.predict_x0(z_t, target, t), z0, atol=2e-5, rtol=0)


def test_at_t999_v_does_not_magnify_the_prediction_error_as_epsilon_does():
    z_t, error = torch.randn(1, 4, 8, 8), torch.full((1, 4, 8, 8), 0.01)
    t = torch.tensor([999])
    a, s = ALPHAS[999].sqrt(), (1 - ALPHAS[999]).sqrt()
    moved = {
        kind: (
            DDPMSchedule(ALPHAS, kind).predict_x0(z_t, error, t)
            - DDPMSchedule(ALPHAS, kind).predict_x0(z_t, 0 * error, t)
        )
        .abs()
        .mean()
        for kind in ("epsilon", "v_prediction")
    }
    torch.testing.assert_close(moved["epsilon"], 0.01 * s / a)  # ~14.7x
    torch.testing.assert_close(moved["v_prediction"], 0.01 * s)  # ~1x


def test_the_v_teacher_regresses_v_on_the_hr_latent(make_cfg, sample_pair):
    module = TeacherModule(**to_dicts(make_cfg(["stage=teacher", V])))
    assert module.noise_schedule.prediction_type == "v_prediction"
    hr, lr = sample_pair
    seen = {}
    module.denoiser.unet.register_forward_hook(
        lambda _, args, kwargs, out: seen.update(out=out[0]), with_kwargs=True
    )
    t = torch.tensor([900])
    noise = torch.randn(1, 4, *module.latent_size(hr), generator=torch.Generator().manual_seed(0))
    loss = module.diffusion_loss(hr, lr, t, noise, torch.tensor([False]))
    z0 = module.codec.encode(hr)
    alphas = module.noise_schedule.alphas_cumprod
    a, s = alphas[900].sqrt(), (1 - alphas[900]).sqrt()
    torch.testing.assert_close(loss, (seen["out"] - (a * noise - s * z0)).pow(2).mean().reshape(1))


@pytest.mark.slow  # a teacher iteration, a student iteration, an upscale
def test_a_v_teacher_distils_into_a_v_student_whose_pipeline_uses_the_v_form(make_cfg):
    teacher = train(make_cfg(["stage=teacher", V, *FAST], sub="teacher"))["teacher"]
    student = train(make_cfg([V, *FAST, f"model.components.unet_path={teacher}",
                              f"model.components.controlnet_path={teacher}"], sub="student"))  # fmt: skip
    assert student["module"].noise_schedule.prediction_type == "v_prediction"
    pipeline = AddSRPipeline.from_folder(student["student"])
    assert pipeline.noise_schedule.prediction_type == "v_prediction"
    steps = pipeline.run(torch.rand(1, 3, 8, 8), steps=2, generator=torch.Generator().manual_seed(0))
    for step in steps:
        a = pipeline.noise_schedule.alphas_cumprod[step.timestep].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(step.x0_latent, a.sqrt() * step.z_t - (1 - a).sqrt() * step.prediction)
