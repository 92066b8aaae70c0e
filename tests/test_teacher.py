"""The teacher stage: Eq. 2 on the LR-conditioned prediction, SeeSR's trainable set, export, and the
AddSR stage distilling from the exported teacher (tiny models, CPU)."""

import pytest
import torch
from diffusers import ControlNetModel
from torch import nn

from addsr_pl.config import ConfigError, validate, validate_teacher
from addsr_pl.core.sampler import upscale
from addsr_pl.method.teacher import TeacherModule, select_teacher_trainable
from addsr_pl.train import train

from conftest import compose_train, to_dicts

FAST = ["data.crop_size=32", "trainer.limit_val_batches=0"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, cache_dir):
    """Two teacher iterations (two micro-batches each) and the exported teacher folder."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = compose_train(out, ["stage=teacher", *FAST, "trainer.max_steps=2"], cache_dir)
    fresh = TeacherModule(**to_dicts(cfg))  # the same start: tiny models are built from seeds
    result = train(cfg)
    return cfg, fresh, result


def test_the_loss_is_eq2_on_the_hr_latent_with_the_lr_as_control(make_cfg, sample_pair):
    module = TeacherModule(**to_dicts(make_cfg(["stage=teacher"])))
    hr, lr = sample_pair
    seen = {}

    def controlnet_inputs(_, args, kwargs):
        seen["z_t"], seen["t"] = args[0], args[1]
        seen["control"], seen["text"] = kwargs["controlnet_cond"], kwargs["encoder_hidden_states"]

    def unet_output(_, args, kwargs, output):
        seen["eps"] = output[0]

    module.denoiser.controlnet.register_forward_pre_hook(controlnet_inputs, with_kwargs=True)
    module.denoiser.unet.register_forward_hook(unet_output, with_kwargs=True)
    t = torch.tensor([600])
    noise = torch.randn(1, 4, *module.latent_size(hr), generator=torch.Generator().manual_seed(0))
    for blank, prompt in ((False, module.conditioner.prompt_encoder.positive_prompt), (True, "")):
        loss = module.diffusion_loss(hr, lr, t, noise, torch.tensor([blank]))
        torch.testing.assert_close(seen["control"], upscale(lr, hr.shape[-2:]), rtol=0, atol=0)
        z0 = module.codec.encode(hr)
        torch.testing.assert_close(seen["z_t"], module.noise_schedule.add_noise(z0, noise, t))
        assert torch.equal(seen["t"], t)
        torch.testing.assert_close(seen["text"], module.conditioner.prompt_encoder.encode([prompt]))
        torch.testing.assert_close(loss, (seen["eps"] - noise).pow(2).mean().reshape(1))


def test_control_hr_blend_moves_a_fraction_of_the_controls_towards_the_hr(make_cfg, sample_pair):
    hr, lr = sample_pair
    lr_up = upscale(lr, hr.shape[-2:])
    module = TeacherModule(**to_dicts(make_cfg(["stage=teacher"])))
    assert module.method["control_hr_blend"] == 0.0  # SeeSR's teacher: LR controls only, no draws
    assert module.control_hr_blend(4, torch.Generator().manual_seed(0)) is None
    module = TeacherModule(**to_dicts(make_cfg(["stage=teacher", "method.control_hr_blend=0.5"])))
    w = module.control_hr_blend(4000, torch.Generator().manual_seed(0))
    assert 0.45 < (w == 0).float().mean() < 0.55 and w.max() < 1
    assert 0.45 < w[w > 0].mean() < 0.55  # U(0, 1) where chosen
    seen = []
    module.denoiser.controlnet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["controlnet_cond"]), with_kwargs=True
    )
    noise = torch.randn(2, 4, *module.latent_size(hr), generator=torch.Generator().manual_seed(0))
    two = lambda x: x.repeat(2, 1, 1, 1)  # noqa: E731
    module.diffusion_loss(two(hr), two(lr), torch.tensor([600, 600]), noise, torch.tensor([False, False]),
                          torch.tensor([0.0, 0.25]))  # fmt: skip
    torch.testing.assert_close(seen[-1][0], lr_up[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[-1][1], 0.25 * hr[0] + 0.75 * lr_up[0])
    with pytest.raises(ConfigError, match="method.control_hr_blend = 1.5"):
        validate(make_cfg(["stage=teacher", "method.control_hr_blend=1.5"]))


def test_seesr_trainable_set_is_the_controlnet_and_the_unets_image_attentions():
    unet = nn.ModuleDict(
        {"down": nn.ModuleDict({"image_attentions": nn.Linear(2, 2), "attentions": nn.Linear(2, 2)})}
    )
    controlnet = nn.ModuleDict({"block": nn.Linear(2, 2), "cond": nn.Linear(2, 2)})
    controlnet.requires_grad_(False)
    select_teacher_trainable(unet, controlnet, ["image_attentions"])
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        "down.image_attentions.weight",
        "down.image_attentions.bias",
    }
    assert all(p.requires_grad for p in controlnet.parameters())


def test_teacher_training_moves_the_controlnet_and_nothing_else(teacher_run):
    _, fresh, result = teacher_run
    module = result["module"]
    assert int(module.iteration) == 2
    before, after = fresh.state_dict(), module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {f"denoiser.{n}" for n, _ in module.trainable()}
    # the tiny UNet has no image_attentions: SeeSR's set is the whole ControlNet here
    assert trainable == {
        f"denoiser.{n}" for n, _ in module.denoiser.named_parameters() if n.startswith("controlnet.")
    }
    assert changed - {"iteration"} == trainable


def test_the_exported_teacher_is_what_the_addsr_stage_distils(teacher_run, make_cfg):
    cfg, fresh, result = teacher_run
    folder = result["teacher"]
    exported = ControlNetModel.from_pretrained(folder, subfolder="controlnet").state_dict()
    trained = result["module"].denoiser.controlnet.state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)

    addsr = make_cfg(
        [
            *FAST,
            "trainer.max_steps=1",
            "export_student=false",
            f"model.components.controlnet_path={folder}",
            f"model.components.unet_path={folder}",
        ]
    )
    module = train(addsr)["module"]
    assert int(module.iteration) == 1
    teacher = module.teacher.controlnet.state_dict()
    assert all(torch.equal(teacher[k], exported[k]) for k in exported)  # frozen, loaded from the folder
    untrained = fresh.denoiser.controlnet.state_dict()
    assert not all(torch.equal(teacher[k], untrained[k]) for k in untrained)
    # the student starts from the teacher: its frozen weights are the teacher's
    student = module.student.controlnet
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(student.state_dict()[n], exported[n]) for n in frozen)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method.timestep_range=[0,2000]"],
            r"method.timestep_range = \[0, 2000\]: needs 0 <= low < high <= 1000",
        ),
        (["method.null_text_ratio=2"], r"method.null_text_ratio = 2: must lie in \[0, 1\]"),
        (["method=addsr"], r"stage=teacher needs the teacher's method settings"),
    ],
)
def test_bad_teacher_values_are_named(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_teacher(make_cfg(["stage=teacher", *overrides]))


def test_with_ema_the_export_holds_the_ema_weights(make_cfg):
    cfg = make_cfg(["stage=teacher", *FAST, "trainer.max_steps=1", "method.ema_decay=0.5"])
    result = train(cfg)
    module = result["module"]
    exported = ControlNetModel.from_pretrained(result["teacher"], subfolder="controlnet").state_dict()
    for name, _ in module.trainable():
        assert torch.equal(exported[name.removeprefix("controlnet.")], module.ema.shadow(name))
    assert not all(torch.equal(exported[n.removeprefix("controlnet.")], p) for n, p in module.trainable())


def test_train_whole_unet_trains_and_exports_every_unet_weight(make_cfg):
    cfg = make_cfg(["stage=teacher", *FAST, "trainer.max_steps=1", "method.train_whole_unet=true"])
    fresh = TeacherModule(**to_dicts(cfg))
    result = train(cfg)
    module = result["module"]
    trainable = {n for n, _ in module.trainable()}
    assert trainable == {n for n, _ in module.denoiser.named_parameters()}
    before = fresh.denoiser.unet.state_dict()
    exported = type(module.denoiser.unet).from_pretrained(result["teacher"], subfolder="unet").state_dict()
    moved = [k for k, v in exported.items() if not torch.equal(v, before[k])]
    assert len(moved) > len(exported) // 2  # AdamW's first step moves every weight with a gradient
    for name, value in module.denoiser.unet.state_dict().items():
        assert torch.equal(exported[name], value)


def test_train_whole_unet_must_be_a_boolean(make_cfg):
    with pytest.raises(ConfigError, match="train_whole_unet"):
        train(make_cfg(["stage=teacher", *FAST, "trainer.max_steps=1", "method.train_whole_unet=maybe"]))
