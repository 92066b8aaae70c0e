"""Prompts and representations reaching the student and the teacher; the training step with each tagger."""

import open_clip
import pytest
import torch

from addsr_pl.core.sampler import upscale
from addsr_pl.method.module import AddSRModule
from addsr_pl.train import train

from conftest import to_dicts

FAST = ["data.crop_size=32", "trainer.limit_val_batches=0", "trainer.max_steps=1"]


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory):
    """A tiny OpenCLIP architecture with its weights in a local file, and a vocabulary file."""
    folder = tmp_path_factory.mktemp("openclip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**config).state_dict(), folder / "tiny.pt")
    (folder / "vocabulary.txt").write_text("cat\ndog\ntree\nsky\n")
    return folder, config


def hydra_value(value) -> str:
    """A dict or scalar in Hydra's override syntax."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def openclip_overrides(folder, config):
    return [
        "conditioning=openclip",
        f"conditioning.tagger.weights={folder / 'tiny.pt'}",
        f"conditioning.tagger.vocabulary={folder / 'vocabulary.txt'}",
        f"+conditioning.tagger.model_config={hydra_value(config)}",
        "conditioning.tagger.representation_dim=16",
        "conditioning.tagger.threshold=0.0",
        "conditioning.tagger.top_k=2",
        "conditioning.tagger.dtype=float32",
    ]


def capture(controlnet):
    seen = []
    controlnet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            (kw["encoder_hidden_states"].clone(), kw.get("image_encoder_hidden_states"))
        ),
        with_kwargs=True,
    )
    return seen


def test_seesr_official_trainable_set_is_image_attentions_and_the_cond_embedding(make_cfg):
    module = AddSRModule(**to_dicts(make_cfg(["model=tiny_seesr", "conditioning=tiny_ram"])))
    names = {n for n, _ in module.student_trainable()}
    expected = {f"unet.{n}" for n, _ in module.student.unet.named_parameters() if ".image_attentions." in n}
    expected |= {
        f"controlnet.{n}"
        for n, p in module.student.controlnet.named_parameters()
        if ".image_attentions." in n or n.startswith("controlnet_cond_embedding.")
    }
    assert names == expected and any(n.startswith("unet.") for n in names)


def test_ram_tags_and_representation_follow_teacher_condition_and_psr(make_cfg, sample_pair):
    """Student: tags and representation of the LR at step 1, representation of the PSR control after;
    teacher (hr): tags and representation of the HR."""
    module = AddSRModule(
        **to_dicts(
            make_cfg(
                [
                    "model=tiny_seesr",
                    "conditioning=tiny_ram",
                    "method.unroll_probs=[0,1]",
                    "method.unroll_start=first",
                    "method.null_text_ratio=0",
                ]
            )
        )
    )
    student, teacher = capture(module.student.controlnet), capture(module.teacher.controlnet)
    hr, lr = sample_pair
    lr_up = upscale(lr, hr.shape[-2:])
    g = torch.Generator().manual_seed(0)
    unroll = module.student_unroll(hr, lr_up, g, g)
    module.teacher_targets(unroll, hr, g)
    tagger, conditioner = module.conditioner.tagger, module.conditioner
    torch.testing.assert_close(student[0][1], tagger.representation(lr_up))
    torch.testing.assert_close(student[1][1], tagger.representation(unroll.steps[1].control_image))
    torch.testing.assert_close(student[0][0], conditioner.text_embeds(lr_up))
    torch.testing.assert_close(teacher[0][1], tagger.representation(hr).repeat_interleave(4, 0))
    torch.testing.assert_close(teacher[0][0], conditioner.text_embeds(hr).repeat_interleave(4, 0))
    assert conditioner.texts(hr) != conditioner.texts(lr_up) or tagger(hr).tags == tagger(lr_up).tags


@pytest.mark.parametrize("conditioning", ["fixed", "tiny_ram", "openclip"])
def test_the_tiny_training_step_runs_with_each_prompt_source(make_cfg, conditioning, tiny_openclip):
    model = "tiny" if conditioning == "fixed" else "tiny_seesr"
    extra = (
        openclip_overrides(*tiny_openclip) if conditioning == "openclip" else [f"conditioning={conditioning}"]
    )
    result = train(make_cfg([*FAST, f"model={model}", *extra, "export_student=false"]))
    module = result["module"]
    assert int(module.iteration) == 1
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss_g"]))
    if conditioning != "fixed":
        assert module.conditioner.use_representation and module.conditioner.prompt_encoder.prompt == "tags"


@pytest.mark.parametrize(("control", "prompt"), [("hr", "lr"), ("lr", "hr")])
def test_table4_cells_split_the_teacher_control_image_from_its_prompt_source(
    make_cfg, sample_pair, control, prompt
):
    module = AddSRModule(
        **to_dicts(
            make_cfg(
                [
                    "model=tiny_seesr",
                    "conditioning=tiny_ram",
                    "method.null_text_ratio=0",
                    f"method.teacher_control_image={control}",
                    f"method.teacher_prompt_source={prompt}",
                ]
            )
        )
    )
    teacher = capture(module.teacher.controlnet)
    seen_control = []
    module.teacher.controlnet.register_forward_pre_hook(
        lambda m, a, kw: seen_control.append(kw["controlnet_cond"].clone()), with_kwargs=True
    )
    hr, lr = sample_pair
    lr_up = upscale(lr, hr.shape[-2:])
    g = torch.Generator().manual_seed(0)
    module.teacher_targets(module.student_unroll(hr, lr_up, g, g), hr, g)
    image = {"hr": hr, "lr": lr_up}
    torch.testing.assert_close(seen_control[0], image[control].repeat_interleave(4, 0))
    representation = module.conditioner.tagger.representation(image[prompt])
    torch.testing.assert_close(teacher[0][1], representation.repeat_interleave(4, 0))
    torch.testing.assert_close(
        teacher[0][0], module.conditioner.text_embeds(image[prompt]).repeat_interleave(4, 0)
    )


def test_the_teacher_stage_trains_a_seesr_teacher_with_its_representation(make_cfg):
    result = train(make_cfg([*FAST, "stage=teacher", "model=tiny_seesr", "conditioning=tiny_ram"]))
    module = result["module"]
    assert int(module.iteration) == 1 and module.conditioner.use_representation
    assert any(".image_attentions." in n for n, _ in module.trainable())
