"""The README flow on the tiny SD3 backbone (`model=sd3_tiny`): train, resume, export, upscale, evaluate,
and the ablation grid; plus the SD3 adapter's own parts (latent control, packed prompt, loader errors).
One tiny run (and its resumed twin) is shared by the module's tests."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file
from test_evaluate import compose_eval

from addsr_pl.config import validate
from addsr_pl.core.noise_schedule import RectifiedFlowSchedule
from addsr_pl.evaluate import evaluate
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.method.module import AddSRModule
from addsr_pl.models.backbones.sd3 import (
    SD3_LAYOUT,
    SD3Denoiser,
    load_sd3_components,
    pack_prompt,
    unpack_prompt,
)
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.diffusion import MissingWeightsError
from addsr_pl.paths import config_dir
from addsr_pl.train import train
from addsr_pl.upscale import main

from conftest import compose_train, to_dicts

SD3 = ["model=sd3_tiny", "data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]


def run(path, overrides, cache_dir):
    return train(compose_train(path, [*SD3, *overrides], cache_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """4 iterations straight, and 2 then `ckpt_path=last` to 4 in one run dir (the README's resume)."""
    root = tmp_path_factory.mktemp("sd3")
    straight = run(root / "straight", ["trainer.max_steps=4"], cache_dir)
    run(root / "resumed", ["trainer.max_steps=2"], cache_dir)
    resumed = run(root / "resumed", ["trainer.max_steps=4", "ckpt_path=last"], cache_dir)
    return straight, resumed


def student_weights(folder):
    return {
        f"{part}.{k}": v
        for part in ("transformer", "controlnet")
        for k, v in load_file(str(folder / part / "diffusion_pytorch_model.safetensors")).items()
    }


def test_training_moves_the_controlnet_only_and_resuming_is_exact(runs):
    straight, resumed = runs
    module = straight["module"]
    trained = {n for n, _ in module.student_trainable()}
    assert trained and all(n.startswith("controlnet.") for n in trained)
    # the frozen transformer is the teacher's, shared and unmoved
    for (name, p), (_, q) in zip(
        module.student.transformer.named_parameters(), module.teacher.transformer.named_parameters()
    ):
        assert p is q, name
    a, b = student_weights(_folder(straight)), student_weights(_folder(resumed))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert int(resumed["module"].iteration) == 4


def _folder(result):
    return Path(result["student"])


def test_the_export_names_the_sd3_parts_and_equal_snr_sigmas(runs, sample_pair):
    straight, _ = runs
    manifest = json.loads((_folder(straight) / "addsr_student.json").read_text())
    assert manifest["backbone"] == "sd3"
    assert manifest["components"]["transformer"]["class"] == "SD3Transformer2DModel"
    assert manifest["components"]["controlnet"]["class"] == "SD3ControlNetModel"
    assert manifest["components"]["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    # SD2's [999, 749, 499, 249] at equal SNR (docs/research: 0.936, 0.803, 0.617, 0.409), never sigma = 1
    assert manifest["sampler"]["student_timesteps"] == pytest.approx([0.936, 0.803, 0.617, 0.409], abs=1e-3)
    loaded = AddSRPipeline.from_folder(_folder(straight))
    assert isinstance(loaded.noise_schedule, RectifiedFlowSchedule)
    assert isinstance(loaded.denoiser, SD3Denoiser)
    _, lr = sample_pair
    module = straight["module"]
    with module.ema.swapped_in():
        expected = module.student_pipeline(4)(lr, generator=torch.Generator().manual_seed(3))
    got = loaded(lr, generator=torch.Generator().manual_seed(3))
    assert got.shape == (1, 3, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_upscale_cli_and_evaluation_run_the_sd3_student(runs, tmp_path):
    straight, _ = runs
    student = str(_folder(straight))
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    code = main(
        [
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            student,
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert im.size == (80, 48)
    cfg = compose_eval(
        tmp_path / "eval",
        [f"student={student}", "steps=[1,2]", "metrics.names=[psnr]", "pd_plot.y_metric=psnr",
         "datasets.sample.names=[chelsea,rocket]", "datasets.sample.crop_size=32"],
    )  # fmt: skip
    table = evaluate(cfg)["markdown"].read_text()
    assert "AddSR-1" in table and "AddSR-2" in table and "PSNR" in table


def test_the_ablation_grid_composes_with_sd3(tmp_path, cache_dir):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=ablation"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    (jobs,) = BasicSweeper.split_arguments(
        OverridesParser.create().parse_overrides(params), max_batch_size=None
    )
    assert len(jobs) == 12
    for i, job in enumerate(jobs):
        composed = compose_train(tmp_path / str(i), [*SD3, "hparams_search=ablation", *job], cache_dir)
        assert composed.model.components._target_.endswith("build_tiny_sd3_components")
        validate(composed)


def test_the_control_enters_as_a_latent_and_the_prompt_packs_its_pooled_projection(runs):
    module = runs[0]["module"]
    tokens, pooled = torch.randn(2, 5, 64), torch.randn(2, 96)
    packed = pack_prompt(tokens, pooled)
    assert packed.shape == (2, 7, 64)  # 96 pooled values in ceil(96 / 64) = 2 tokens
    back_tokens, back_pooled = unpack_prompt(packed, 96)
    assert torch.equal(back_tokens, tokens) and torch.equal(back_pooled, pooled)
    embeds = module.conditioner.prompt_encoder.encode(["a cat"])
    width = module.teacher.transformer.config.joint_attention_dim
    assert embeds.shape == (1, 16 + 256 + 1, width)  # CLIP tokens, T5 tokens, one token of pooled (64)
    z = torch.randn(1, 8, 4, 4)
    t = torch.tensor([500.0])
    control = torch.rand(1, 3, 32, 32)
    cond = module.conditioner.condition(control)
    with torch.no_grad():
        a = module.teacher(z, t, control, cond)
        b = module.teacher(z, t, control.flip(-1), cond)
    assert a.shape == z.shape and not torch.allclose(a, b)  # the ControlNet reads its control


def test_rams_representation_joins_the_joint_attention_context(cache_dir, tmp_path):
    ram = [*SD3, "conditioning=tiny_ram", "conditioning.representation_in_context=true"]
    result = train(compose_train(tmp_path / "ram", [*ram, "trainer.max_steps=1"], cache_dir))
    module = result["module"]
    assert module.conditioner.use_representation
    control = torch.rand(1, 3, 32, 32)
    cond = module.conditioner.condition(control)
    assert cond.image_embeds is not None and cond.image_embeds.shape[-1] == 16
    z, t = torch.randn(1, 8, 4, 4), torch.tensor([500.0])
    with torch.no_grad():
        with_representation = module.teacher(z, t, control, cond)
        without = module.teacher(z, t, control, Conditioning(cond.text_embeds))
    assert not torch.allclose(with_representation, without)
    assert AddSRPipeline.from_folder(result["student"]).conditioner.use_representation
    # off, the tagger gives tags only
    plain = AddSRModule(
        **to_dicts(compose_train(tmp_path / "tags", [*SD3, "conditioning=tiny_ram"], cache_dir))
    )
    assert not plain.conditioner.use_representation


def test_representation_in_context_is_refused_where_it_cannot_work(cache_dir, tmp_path):
    no_tagger = compose_train(
        tmp_path / "a", [*SD3, "conditioning.representation_in_context=true"], cache_dir
    )
    with pytest.raises(ValueError, match="needs a tagger for the representation"):
        AddSRModule(**to_dicts(no_tagger))
    sd2 = compose_train(
        tmp_path / "b", ["conditioning=tiny_ram", "conditioning.representation_in_context=true"], cache_dir
    )
    with pytest.raises(ValueError, match="SD2 takes the representation through SeeSR's"):
        AddSRModule(**to_dicts(sd2))


def test_the_loader_names_every_missing_file_and_the_key(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError) as error:
        load_sd3_components(str(tmp_path), {}, 1)
    message = str(error.value)
    assert "\n" not in message and "model.components.pretrained_path" in message
    assert "text_encoder_3/config.json" in message and "tokenizer_2/tokenizer_config.json" in message
    assert "transformer/config.json" not in message


def test_the_loader_reads_a_diffusers_sd3_folder(tmp_path, cache_dir):
    cfg = compose_train(tmp_path / "cfg", SD3, cache_dir)
    components = instantiate(cfg.model.components, _convert_="all")
    folder = tmp_path / "sd3"
    for name in SD3_LAYOUT:
        getattr(components, name).save_pretrained(folder / name)
    reference = dict(cfg.model.components.reference_scheduler)
    loaded = load_sd3_components(str(folder), reference, 1)
    for name in ("transformer", "vae", "text_encoder_3"):
        theirs, ours = getattr(components, name).state_dict(), getattr(loaded, name).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs), name
    # a fresh ControlNet: the transformer's first block, its control embedding zero (a no-op at start)
    first = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(loaded.controlnet.state_dict()[first], loaded.transformer.state_dict()[first])
    assert not loaded.controlnet.pos_embed_input.proj.weight.any()
    assert loaded.transformer.config.num_layers == components.transformer.config.num_layers
    assert loaded.sources["transformer"] == str(folder) and loaded.sources["controlnet"] is None
