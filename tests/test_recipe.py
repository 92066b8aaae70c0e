"""`recipe: official | paper` and the settings it switches: G/D order, EMA cadence, prompts, the
discriminator's condition gain, Eq. 1/4 precision, the refusal of sample-prediction models."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from addsr_pl.core.sampler import add_noise, predict_x0
from addsr_pl.method.module import AddSRModule
from addsr_pl.models.conditioning import PromptEncoder
from addsr_pl.models.discriminator import EqualizedLinear
from addsr_pl.train import build_callbacks, build_trainer

from conftest import to_dicts

FAST = ["data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]
POSITIVE = "clean, sharp"


def test_official_recipe_switches_each_departure_and_paper_is_the_default(make_cfg):
    paper, official = make_cfg(), make_cfg(["recipe=official"], sub="official")
    assert paper.recipe == "paper" and official.recipe == "official"
    switched = {
        "method.ta_indexing": ("graded", "official"),
        "method.student_prompt_source": ("lr", "hr"),
        "method.gd_order": ("generator_first", "discriminator_first"),
        "method.ema_every": ("iteration", "micro_step"),
        "method.accumulate_grad_batches": (1, 2),
        "conditioning.train_tags": ("tagger", "original_ram"),
        "conditioning.train_positive_prompt": (True, False),
        "conditioning.prompt_join": ("clean", "official"),
        "conditioning.inference_tagger_input": ("upscaled", "lr_bilinear"),
    }
    for key, (in_paper, in_official) in switched.items():
        assert OmegaConf.select(paper, key) == in_paper, key
        assert OmegaConf.select(official, key) == in_official, key


def test_eq1_and_eq4_run_in_fp32_under_bf16_inputs_and_autocast():
    alphas = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float32)  # SD2's range of alpha_bar
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_t = add_noise(z0, noise, t, alphas)
        x0 = predict_x0(z_t, noise, t, alphas)
    assert z_t.dtype == x0.dtype == torch.float32
    # bf16 arithmetic would leave ~2e-2 rms here (1/sqrt(alpha_bar_999) ~ 15 magnifies its rounding)
    assert (x0 - z0.float()).pow(2).mean().sqrt() < 1e-5
    double = add_noise(z0.double(), noise.double(), t, alphas)
    assert double.dtype == torch.float64


def test_an_unknown_prediction_type_is_refused_at_start_up(make_cfg):
    cfg = make_cfg(["model.components.scheduler.prediction_type=flow"])
    with pytest.raises(ValueError, match="'flow'.*epsilon, v_prediction, sample"):
        AddSRModule(**to_dicts(cfg))


def test_equalized_cmapper_moves_sqrt_in_features_times_slower_under_adamw():
    torch.manual_seed(0)
    in_features = 384
    equalized, plain = EqualizedLinear(in_features, 8), torch.nn.Linear(in_features, 8)
    # initial effective weights: N(0, 1/in_features)
    assert abs(equalized.weight.std().item() - 1.0) < 0.05 and equalized.bias.abs().max() == 0
    x = torch.randn(16, in_features)
    torch.testing.assert_close(equalized(x), x @ (equalized.weight / math.sqrt(in_features)).T)
    moves = []
    for layer in (equalized, plain):
        effective = lambda layer=layer: layer.weight * getattr(layer, "gain", 1.0)  # noqa: E731
        before = effective().detach().clone()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.0)
        layer(x).pow(2).mean().backward()
        opt.step()
        moves.append((effective().detach() - before).abs().mean())
    torch.testing.assert_close(moves[1] / moves[0], torch.tensor(math.sqrt(in_features)), rtol=1e-3, atol=0)


def test_prompt_joins_and_the_official_training_caption():
    def encoder(prompt, join="clean", train_positive=True):
        return PromptEncoder(None, None, prompt, POSITIVE, "", join, train_positive)

    assert encoder("tags").compose("cat, tree") == "cat, tree, clean, sharp"
    # the official pipeline: "{tags}, {prompt}," + positive, so an empty prompt leaves ", ,"
    assert encoder("tags", "official").compose("cat, tree") == "cat, tree, ,clean, sharp"
    assert encoder("tags", "official").compose("cat", "red") == "cat, red,clean, sharp"
    assert encoder("fixed", "official").compose("cat") == POSITIVE
    official_training = encoder("tags", "official", train_positive=False)
    assert official_training.compose("cat, tree", training=True) == "cat, tree, "
    assert official_training.compose("cat, tree") == "cat, tree, ,clean, sharp"  # inference keeps it
    with pytest.raises(ValueError, match="prompt_join"):
        encoder("tags", "tight")


def test_student_prompt_source_selects_the_image_the_training_tags_describe(make_cfg, sample_pair):
    hr, lr = sample_pair
    for source in ("lr", "hr"):
        cfg = make_cfg(
            [
                "conditioning=tiny_ram",
                "model=tiny_seesr",
                "method.null_text_ratio=0",
                f"method.student_prompt_source={source}",
            ],
            sub=source,
        )
        module = AddSRModule(**to_dicts(cfg))
        lr_up = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic").clamp(0, 1)
        g = torch.Generator().manual_seed(0)
        unroll = module.student_unroll(hr, lr_up, g, g)
        described = {"hr": hr, "lr": lr_up}[source]
        expected = module.conditioner.text_embeds(described, unroll.blank, training=True)
        assert torch.equal(unroll.text_embeds, expected)


class StepOrder(pl.Callback):
    """Which optimizer steps, in order, and the student's trainable weights after every micro-step."""

    def __init__(self):
        self.order, self.weights = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        opt_g, _ = module.optimizers(use_pl_optimizer=False)
        self.order.append("g" if optimizer is opt_g else "d")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().float().clone() for n, p in module.student_trainable()})


def test_official_recipe_steps_d_before_g_and_moves_the_ema_every_micro_step(make_cfg):
    cfg = make_cfg(["recipe=official", *FAST, "trainer.max_steps=2", "method.ema_decay=0.5"])
    module = AddSRModule(**to_dicts(cfg))
    start = {n: p.detach().float().clone() for n, p in module.student_trainable()}
    recorder = StepOrder()
    trainer = build_trainer(cfg, [*build_callbacks(cfg), recorder], [])
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert recorder.order == ["d", "g", "d", "g"]  # 2 iterations of 2 micro-steps
    assert len(recorder.weights) == 4
    for name, shadow in start.items():
        expected = shadow.clone()
        for weights in recorder.weights:  # one EMA update per micro-step, with the weights of that moment
            expected.lerp_(weights[name], 0.5)
        torch.testing.assert_close(module.ema.shadow(name), expected)
