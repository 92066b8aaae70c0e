"""AddSRModule's boxes of Fig. 2 on the tiny model: PSR, teacher conditioning, trainable set."""

import contextlib

import pytest
import torch

from addsr_pl.core.sampler import upscale
from addsr_pl.method.module import AddSRModule

from conftest import to_dicts


def build(make_cfg, overrides):
    return AddSRModule(**to_dicts(make_cfg(overrides)))


def capture_controlnet_inputs(controlnet):
    seen = []

    def hook(module, args, kwargs):
        seen.append(
            {
                "cond": kwargs["controlnet_cond"].detach().clone(),
                "text": kwargs["encoder_hidden_states"].clone(),
            }
        )

    controlnet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def independent_decode(module, latent):
    vae = module.codec.vae
    return ((vae.decode(latent / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("psr_weight", [1.0, 0.3])
def test_psr_controls_step_2_with_the_blend_of_the_decoded_step_1_x0_and_the_lr(
    make_cfg, sample_pair, psr_weight
):
    module = build(
        make_cfg,
        ["method.unroll_probs=[0,1]", "method.unroll_start=first", f"method.psr_weight={psr_weight}"],
    )
    seen = capture_controlnet_inputs(module.student.controlnet)
    hr, lr = sample_pair
    lr_up = upscale(lr, hr.shape[-2:])
    g = torch.Generator().manual_seed(0)
    unroll = module.student_unroll(hr, lr_up, g, g)
    assert unroll.k == 2 and len(seen) == 2
    torch.testing.assert_close(seen[0]["cond"], lr_up)
    with torch.no_grad():
        x0_image = independent_decode(module, unroll.steps[0].x0_latent)
    expected = psr_weight * x0_image + (1 - psr_weight) * lr_up
    torch.testing.assert_close(seen[1]["cond"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[1]["cond"], lr_up, atol=1e-3)


def test_without_psr_every_step_is_controlled_by_the_lr(make_cfg, sample_pair):
    module = build(make_cfg, ["method.unroll_probs=[0,0,1]", "method.unroll_start=first", "method.psr=false"])
    seen = capture_controlnet_inputs(module.student.controlnet)
    hr, lr = sample_pair
    lr_up = upscale(lr, hr.shape[-2:])
    g = torch.Generator().manual_seed(0)
    module.student_unroll(hr, lr_up, g, g)
    assert len(seen) == 3
    for step in seen:
        torch.testing.assert_close(step["cond"], lr_up)


def test_only_the_graded_step_has_a_graph(make_cfg, sample_pair):
    module = build(make_cfg, ["method.unroll_probs=[0,1]"])
    hr, lr = sample_pair
    g = torch.Generator().manual_seed(0)
    unroll = module.student_unroll(hr, upscale(lr, hr.shape[-2:]), g, g)
    assert not unroll.steps[0].x0_latent.requires_grad
    assert unroll.graded.x0_latent.requires_grad and unroll.graded.x0_image.requires_grad


@pytest.mark.parametrize("condition", ["hr", "lr"])
def test_teacher_condition_selects_what_reaches_the_teacher(make_cfg, sample_pair, condition):
    module = build(
        make_cfg, [f"method.teacher_condition={condition}", "method.teacher_timesteps_per_sample=3"]
    )
    seen = capture_controlnet_inputs(module.teacher.controlnet)
    hr, lr = sample_pair
    lr_up = upscale(lr, hr.shape[-2:])
    g = torch.Generator().manual_seed(0)
    unroll = module.student_unroll(hr, lr_up, g, g)
    x0, t = module.teacher_targets(unroll, hr, g)
    assert len(seen) == 1 and x0.shape[0] == 3 and t.shape == (3,)
    source = hr if condition == "hr" else lr_up
    torch.testing.assert_close(seen[0]["cond"], source.repeat_interleave(3, 0))
    other = lr_up if condition == "hr" else hr
    assert not torch.allclose(seen[0]["cond"], other.repeat_interleave(3, 0), atol=1e-3)
    torch.testing.assert_close(seen[0]["text"], unroll.text_embeds.repeat_interleave(3, 0))


@pytest.mark.parametrize(
    ("trainable", "expect"),
    [("official", "controlnet_cond_embedding"), ("controlnet", "controlnet."), ("lora", "lora_")],
)
def test_trainable_set(make_cfg, trainable, expect):
    module = build(make_cfg, [f"method.trainable={trainable}"])
    names = [n for n, _ in module.student_trainable()]
    assert names and any(expect in n for n in names)
    assert all(n.startswith("controlnet.") or "lora_" in n for n in names)
    if trainable == "official":  # a plain SD2 ControlNet: its attention blocks and conditioning embedding
        assert all(".attentions." in n or "controlnet_cond_embedding" in n for n in names)
    if trainable == "lora":
        assert any(n.startswith("unet.") for n in names)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.codec.parameters())
    assert not any(p.requires_grad for p in module.discriminator.backbone.parameters())
    assert all(p.requires_grad for p in module.discriminator.heads.parameters())


@pytest.mark.parametrize("passes", [None, "one_pass_per_image"])
def test_an_iteration_runs_rams_image_encoder_once_per_distinct_image_batch(make_cfg, sample_pair, passes):
    """k = 2 with PSR, tag prompts from the upscaled LR, the HR-conditioned teacher: RAM sees the upscaled
    LR (the student's tags and step 1's representation), step 2's control image and the HR (the teacher's
    tags and representation): three encoder passes, where tagging and representing apart would take five."""
    import pytorch_lightning as pl

    module = build(
        make_cfg,
        [
            "model=tiny_seesr",
            "conditioning=tiny_ram",
            "method.unroll_probs=[0,1]",
            "method.unroll_start=first",
        ],
    )
    assert (
        module.conditioner.prompt_encoder.prompt == "tags" and module.method["student_prompt_source"] == "lr"
    )
    calls = []
    module.conditioner.tagger.ram.visual_encoder.register_forward_hook(lambda *_: calls.append(1))
    hr, lr = sample_pair
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,  # one iteration: a G and a D optimizer step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    if passes is None:  # what the iteration's conditioning costs without the shared passes
        module.conditioner.one_pass_per_image = contextlib.nullcontext
    trainer.fit(module, torch.utils.data.DataLoader([{"hr": hr[0], "lr": lr[0]}], batch_size=1))
    assert int(module.iteration) == 1
    assert len(calls) == (5 if passes is None else 3)
