"""TA weights, unroll draws and the losses, against their formulas."""

import pytest
import torch

from addsr_pl.core.noise_schedule import DDPMSchedule
from addsr_pl.method.losses import (
    discriminator_hinge_loss,
    distillation_loss,
    generator_loss,
    sample_unroll,
    ta_step_index,
    ta_weights,
)

EXP = {"base": 0.5, "ratio": 2.1}
LIN = {"slope": 0.2, "intercept": 0.5}


def test_ta_exponential_is_half_times_2_1_to_the_s_minus_1():
    w = ta_weights("exponential", 4, EXP, LIN)
    assert w.tolist() == [0.5, 0.5 * 2.1, 0.5 * 2.1**2, 0.5 * 2.1**3]


def test_ta_linear_is_0_2_s_plus_0_5():
    w = ta_weights("linear", 4, EXP, LIN)
    assert w.tolist() == [0.2 * s + 0.5 for s in (1, 2, 3, 4)]


def test_ta_none_and_list():
    assert ta_weights("none", 4, EXP, LIN).tolist() == [1.0] * 4
    assert ta_weights([1, 2, 3, 4.5], 4, EXP, LIN).tolist() == [1.0, 2.0, 3.0, 4.5]


def test_ta_rejects_unknown_and_wrong_length():
    with pytest.raises(ValueError, match="ta_schedule = 'cosine'"):
        ta_weights("cosine", 4, EXP, LIN)
    with pytest.raises(ValueError, match="one per student timestep"):
        ta_weights([1.0, 2.0], 4, EXP, LIN)


def test_official_ta_indexing_reproduces_the_official_weight_table():
    """Official effective weights by graded step: 749 -> 0.5, 499 -> 1.05, 249 -> 2.205, 999 (k=1) -> 4.6305."""
    w = ta_weights("exponential", 4, EXP, LIN)
    start = torch.tensor([0, 1, 2])
    two_step = w[ta_step_index(start + 1, start, 2, 4, "official")]
    assert torch.allclose(two_step, torch.tensor([0.5, 1.05, 2.205], dtype=torch.float64))
    one_step = w[ta_step_index(torch.tensor([0]), torch.tensor([0]), 1, 4, "official")]
    assert torch.allclose(one_step, torch.tensor([4.6305], dtype=torch.float64))
    graded = w[ta_step_index(torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long), 2, 4, "graded")]
    assert graded.tolist() == w.tolist()


def test_unroll_draws_follow_the_configured_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.25, 0.75])
    ks, starts = [], []
    for _ in range(2000):
        k, start = sample_unroll(probs, 4, 3, "random", g)
        ks.append(k)
        starts.append(start)
    share_two = sum(k == 2 for k in ks) / len(ks)
    assert abs(share_two - 0.75) < 0.03
    two = torch.cat([s for s, k in zip(starts, ks) if k == 2])
    assert set(two.tolist()) == {0, 1, 2}  # a 2-step unroll can start at 999, 749 or 499
    assert all((s == 0).all() for s, k in zip(starts, ks) if k == 1)  # one step always runs the first t


def test_distillation_loss_weights_each_teacher_timestep_by_sqrt_alpha_bar():
    alphas = torch.linspace(0.9, 0.1, 1000)
    student = torch.zeros(2, 3, 4, 4)
    teacher = torch.ones(4, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    t = torch.tensor([0, 10, 500, 999])
    loss = distillation_loss(student, teacher, DDPMSchedule(alphas).distillation_weight(t))
    expected0 = (alphas[0].sqrt() * 1 + alphas[10].sqrt() * 4) / 2
    expected1 = (alphas[500].sqrt() * 9 + alphas[999].sqrt() * 16) / 2
    assert torch.allclose(loss, torch.stack([expected0, expected1]))


def test_gan_losses():
    real = torch.tensor([[2.0, 0.5]])
    fake = torch.tensor([[-2.0, 0.5]])
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert generator_loss(fake).item() == pytest.approx(0.75)
