"""`method.speed` in training (method/speed.py): the compiled iteration equals eager, and a run resumes
across the two (tiny SeeSR preset with RAM, CPU; dynamo traces with aot_eager, inductor's code generation is
checked on the same modules by tests/test_compile_cache.py)."""

import shutil

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch._dynamo.utils import counters

from addsr_pl.method.module import AddSRModule
from addsr_pl.method.speed import TrainingSpeed, training_compile_cache
from addsr_pl.resume import read_checkpoint
from addsr_pl.train import build_callbacks, build_module, build_trainer, train

from conftest import compose_train, to_dicts

SPEED = {
    "channels_last": "auto",
    "tf32": "auto",
    "compile": "auto",
    "compile_backend": "inductor",
    "compile_cache": None,
    "cuda_graph": "auto",
    "cuda_graph_warmup": 2,
    "cuda_graph_cache": 4,
    "tagger_in_compute_dtype": "auto",
}
# A learning rate at which a region computing anything else moves the weights past the tolerance.
RUN = [
    "model=tiny_seesr",
    "conditioning=tiny_ram",
    "data.crop_size=32",
    "data.batch_size=2",
    "trainer.limit_val_batches=0",
    "method.optimizer_g.lr=1e-3",
    "method.optimizer_d.lr=1e-3",
    "callbacks.checkpoint.every_n_iterations=1",
]
COMPILED = ["method.speed.compile=default", "method.speed.compile_backend=aot_eager"]


def test_auto_is_on_for_cuda_and_off_on_the_cpu_and_bad_values_are_named():
    cpu = TrainingSpeed.for_device(SPEED, torch.device("cpu"))
    cuda = TrainingSpeed.for_device(SPEED, torch.device("cuda"))
    assert (cpu.channels_last, cpu.tf32, cpu.compile, cpu.cuda_graph, cpu.tagger_in_compute_dtype) == (
        (False, False, "none", False, False)
    )
    assert (cuda.channels_last, cuda.tf32, cuda.compile, cuda.cuda_graph, cuda.tagger_in_compute_dtype) == (
        (True, True, "default", True, True)
    )
    # torch.compile's own CUDA graphs replace ours; ours never run off CUDA
    assert not TrainingSpeed.for_device(
        {**SPEED, "compile": "reduce-overhead"}, torch.device("cuda")
    ).cuda_graph
    assert not TrainingSpeed.for_device({**SPEED, "cuda_graph": True}, torch.device("cpu")).cuda_graph
    assert TrainingSpeed.for_device(
        {**SPEED, "compile_backend": "eager"}, torch.device("cpu")
    ).compile_options() == {
        "backend": "eager",
        "dynamic": False,
    }
    for key, value, message in [
        ("compile", "fast", "method.speed.compile = 'fast'"),
        ("compile_backend", "tvm", "method.speed.compile_backend = 'tvm'"),
        ("channels_last", "yes", "method.speed.channels_last = 'yes'"),
        ("cuda_graph_cache", 0, "method.speed.cuda_graph_cache = 0"),
    ]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            TrainingSpeed.for_device({**SPEED, key: value}, torch.device("cpu"))


def trained_state(run) -> dict:
    return read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.slow  # dynamo traces every region and block: about a minute on 2 CPU cores
def test_a_compiled_run_resumes_an_eager_checkpoint_and_continues_as_eager_does(tmp_path, cache_dir):
    """Two eager iterations, then two more resumed from its last.ckpt eagerly and compiled: the same
    trained weights, EMA and discriminator heads (and the compiled run's checkpoint has the same keys)."""
    eager = tmp_path / "eager"
    train(compose_train(eager, [*RUN, "trainer.max_steps=2"], cache_dir))
    compiled = tmp_path / "compiled"
    shutil.copytree(eager, compiled)
    resume = ["trainer.max_steps=4", "ckpt_path=last"]
    train(compose_train(eager, [*RUN, *resume], cache_dir))
    graphs_before = counters["stats"]["unique_graphs"]
    train(compose_train(compiled, [*RUN, *COMPILED, *resume], cache_dir))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled run traced its regions
    expected, got = trained_state(eager), trained_state(compiled)
    assert got.keys() == expected.keys()
    assert int(got["iteration"]) == 4
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


class KeepModule(pl.Callback):
    def on_fit_end(self, trainer, module):
        self.module = module


def cuda_run(tmp_path, cache_dir, overrides: list[str]):
    cfg = compose_train(
        tmp_path,
        [*RUN, "trainer.accelerator=gpu", "trainer.max_steps=3", "callbacks.checkpoint.every_n_iterations=3",
         *overrides],
        cache_dir,
    )  # fmt: skip
    keep = KeepModule()
    trainer = build_trainer(cfg, [*build_callbacks(cfg), keep], [])
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    return keep.module


@pytest.mark.gpu
def test_on_cuda_the_graphed_frozen_half_is_captured_once_and_trains_as_eager(tmp_path, cache_dir):
    """Three fp32 iterations with the frozen half's CUDA graphs against eager: one capture per region and
    input signature, then replays, and the same trained weights."""
    eager = cuda_run(
        tmp_path / "eager", cache_dir, ["method.speed.compile=none", "method.speed.cuda_graph=false"]
    )
    graphed = cuda_run(
        tmp_path / "graphed", cache_dir, ["method.speed.compile=none", "method.speed.cuda_graph=true"]
    )
    assert graphed.speed.cuda_graph and not eager.speed.cuda_graph
    # the HR and the upscaled LR share the encode's signature
    assert graphed.frozen_encode.graphs.captures == 1
    assert graphed.frozen_teacher_x0.graphs.captures == 1
    assert graphed.frozen_condition.graphs.captures == 1
    expected = dict(eager.student_trainable())
    for name, value in graphed.student_trainable():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("in_compute_dtype", [True, False])
def test_the_tagger_runs_in_the_compute_dtype_only_when_asked(make_cfg, in_compute_dtype):
    """`tagger_in_compute_dtype`: RAM in bf16 with fp32 thresholds (their tags on photos: tests/test_ram.py),
    else in conditioning.tagger.dtype."""
    module = AddSRModule(**to_dicts(make_cfg(["model=tiny_seesr", "conditioning=tiny_ram"])))
    module.cast_frozen(torch.bfloat16, tagger=in_compute_dtype)
    tagger = module.conditioner.tagger
    assert tagger.ram.fc.weight.dtype == (torch.bfloat16 if in_compute_dtype else torch.float32)
    assert tagger.class_thresholds.dtype == torch.float32
    assert module.teacher.unet.dtype == torch.bfloat16


def test_a_training_run_keeps_its_compiled_graphs_in_one_entry_per_architecture(make_cfg, tmp_path):
    """The same config finds the same entry of the compile cache (a requeued run loads its graphs); another
    architecture or compile mode finds another."""
    speed = TrainingSpeed.for_device({**SPEED, "compile": "default"}, torch.device("cpu"))
    cpu = torch.device("cpu")

    def entry(overrides, speed=speed):
        module = AddSRModule(**to_dicts(make_cfg(overrides)))
        return training_compile_cache(module, speed, cpu, str(tmp_path)).folder

    tiny = entry([])
    assert tiny == entry([]) and tiny.parent == tmp_path
    assert entry(["model=tiny_seesr", "conditioning=tiny_ram"]) != tiny
    assert (
        entry([], TrainingSpeed.for_device({**SPEED, "compile": "max-autotune-no-cudagraphs"}, cpu)) != tiny
    )
