"""The sampler's two ways to noise steps after the first: ADD's fresh noise (the student's) and DDIM's
deterministic re-noising (a diffusion teacher's many steps)."""

import pytest
import torch
from diffusers import DDPMScheduler

from addsr_pl.core.noise_schedule import DDPMSchedule
from addsr_pl.core.sampler import sample_student
from addsr_pl.inference.pipeline import AddSRPipeline

SCHEDULE = DDPMSchedule(
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
)


def test_the_implied_noise_is_the_noise_that_made_z_t():
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 500, 3])
    torch.testing.assert_close(
        SCHEDULE.implied_noise(SCHEDULE.add_noise(z0, noise, t), noise, t), noise, atol=1e-4, rtol=0
    )


def sample(pipeline, lr, noises, renoise):
    lr_up, text_embeds, representation, timesteps, _, _ = pipeline._inputs(lr, 4, None, None)
    with torch.no_grad():
        steps = sample_student(
            pipeline.denoiser, pipeline.codec, lr_up=lr_up, text_embeds=text_embeds,
            represent=pipeline.conditioner.represent, timesteps=timesteps, noises=noises,
            noise_schedule=pipeline.noise_schedule, start_latent=pipeline.codec.encode(lr_up), psr=True,
            psr_weight=1.0, first_representation=representation, renoise=renoise)  # fmt: skip
    return steps


def test_ddim_uses_only_the_first_noise_and_fresh_uses_every_one(tiny_student, sample_pair):
    _, lr = sample_pair
    pipeline = AddSRPipeline.from_folder(tiny_student)
    shape = (1, pipeline.latent_channels, 8, 8)
    gen = torch.Generator().manual_seed(1)
    first, a, b = (
        torch.randn(shape, generator=gen),
        torch.randn(3, *shape[1:], generator=gen),
        torch.randn(3, *shape[1:], generator=gen),
    )
    ddim_a = sample(pipeline, lr, [first, *a[:, None]], "ddim")
    ddim_b = sample(pipeline, lr, [first, *b[:, None]], "ddim")
    fresh_a = sample(pipeline, lr, [first, *a[:, None]], "fresh")
    fresh_b = sample(pipeline, lr, [first, *b[:, None]], "fresh")
    assert torch.equal(ddim_a[-1].x0_image, ddim_b[-1].x0_image)
    assert not torch.equal(fresh_a[-1].x0_image, fresh_b[-1].x0_image)
    # step 2 of DDIM re-noises step 1's x0 with the noise step 1's z_t implies
    s1, s2 = ddim_a[0], ddim_a[1]
    schedule = pipeline.noise_schedule
    expected = schedule.add_noise(
        s1.x0_latent, schedule.implied_noise(s1.z_t, s1.prediction, s1.timestep), s2.timestep
    )
    torch.testing.assert_close(s2.z_t, expected.to(s2.z_t.dtype))
    with pytest.raises(ValueError, match="renoise = 'ancestral': must be one of fresh, ddim"):
        sample(pipeline, lr, [first, *a[:, None]], "ancestral")
