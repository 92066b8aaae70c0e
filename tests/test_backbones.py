"""The README flow on every tiny backbone besides SD2's (`model=sd3_tiny|sdxl_tiny|flux_tiny`): train 4
iterations, resume exactly, export, `addsr-pl upscale`, `python -m addsr_pl.evaluate`, and the ablation
grid. One tiny run (and its resumed twin) per backbone is shared by the module's tests."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image
from safetensors.torch import load_file
from test_evaluate import compose_eval

from addsr_pl.config import validate
from addsr_pl.evaluate import evaluate
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.paths import config_dir
from addsr_pl.train import train
from addsr_pl.upscale import main

from conftest import compose_train

FAST = ["data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]
# model -> (the manifest's backbone, its class of the base network, the exported student timesteps)
EXPECTED = {
    # SD2's [999, 749, 499, 249] at equal SNR (docs/method.md), never sigma = 1
    "sd3_tiny": ("sd3", "SD3Transformer2DModel", [0.936, 0.803, 0.617, 0.409]),
    "sdxl_tiny": ("sdxl", "UNet2DConditionModel", [999, 749, 499, 249]),
    "flux_tiny": ("flux", "FluxTransformer2DModel", [0.936, 0.803, 0.617, 0.409]),
}


def run(path, model, overrides, cache_dir):
    return train(compose_train(path, [f"model={model}", *FAST, *overrides], cache_dir))


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def runs(request, tmp_path_factory, cache_dir):
    """(model, 4 iterations straight, 2 then `ckpt_path=last` to 4 in one run dir: the README's resume)."""
    model = request.param
    root = tmp_path_factory.mktemp(model)
    straight = run(root / "straight", model, ["trainer.max_steps=4"], cache_dir)
    run(root / "resumed", model, ["trainer.max_steps=2"], cache_dir)
    resumed = run(root / "resumed", model, ["trainer.max_steps=4", "ckpt_path=last"], cache_dir)
    return model, straight, resumed


def student_weights(result, networks):
    folder = Path(result["student"])
    return {
        f"{net}.{k}": v
        for net in networks
        for k, v in load_file(str(folder / net / "diffusion_pytorch_model.safetensors")).items()
    }


def test_training_moves_the_controlnet_only_and_resuming_is_exact(runs):
    _, straight, resumed = runs
    module = straight["module"]
    trained = {n for n, _ in module.student_trainable()}
    assert trained and all(n.startswith("controlnet.") for n in trained)
    base = module.backbone.networks[0]  # the frozen transformer / UNet: the teacher's, shared and unmoved
    student, teacher = module.student.networks()[base], module.teacher.networks()[base]
    assert all(p is q for p, q in zip(student.parameters(), teacher.parameters()))
    a = student_weights(straight, module.backbone.networks)
    b = student_weights(resumed, module.backbone.networks)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert int(resumed["module"].iteration) == 4


def test_the_exported_student_is_the_in_memory_ema_student(runs, sample_pair):
    model, straight, _ = runs
    family, base_class, timesteps = EXPECTED[model]
    manifest = json.loads((Path(straight["student"]) / "addsr_student.json").read_text())
    assert manifest["backbone"] == family
    base = straight["module"].backbone.networks[0]
    assert manifest["components"][base]["class"] == base_class
    assert manifest["sampler"]["student_timesteps"] == pytest.approx(timesteps, abs=1e-3)
    loaded = AddSRPipeline.from_folder(straight["student"])
    _, lr = sample_pair
    module = straight["module"]
    with module.ema.swapped_in():
        expected = module.student_pipeline(4)(lr, generator=torch.Generator().manual_seed(3))
    got = loaded(lr, generator=torch.Generator().manual_seed(3))
    assert got.shape == (1, 3, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_upscale_cli_and_evaluation_run_the_student(runs, tmp_path):
    _, straight, _ = runs
    student = str(straight["student"])
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert (
        main([str(tmp_path / "in"), "-o", str(out), "--model", student, "--steps", "2", "--no-progress"]) == 0
    )
    with Image.open(out / "a.png") as im:
        assert im.size == (80, 48)
    cfg = compose_eval(
        tmp_path / "eval",
        [f"student={student}", "steps=[1,2]", "metrics.names=[psnr]", "pd_plot.y_metric=psnr",
         "datasets.sample.names=[chelsea,rocket]", "datasets.sample.crop_size=32"],
    )  # fmt: skip
    table = evaluate(cfg)["markdown"].read_text()
    assert "AddSR-1" in table and "AddSR-2" in table and "PSNR" in table


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_the_ablation_grid_composes_with_the_backbone(model, tmp_path, cache_dir):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=ablation"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    (jobs,) = BasicSweeper.split_arguments(
        OverridesParser.create().parse_overrides(params), max_batch_size=None
    )
    assert len(jobs) == 12
    for i, job in enumerate(jobs):
        composed = compose_train(
            tmp_path / str(i), [f"model={model}", *FAST, "hparams_search=ablation", *job], cache_dir
        )
        assert model.removesuffix("_tiny") in composed.model.components._target_
        validate(composed)
