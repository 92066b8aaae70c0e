"""Training end to end on the tiny model and the embedded sample photos (CPU)."""

import logging
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.method.module import AddSRModule
from addsr_pl.train import build_callbacks, build_trainer, stop_message_in_iterations, train

from conftest import to_dicts

FAST = ["data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]


def test_the_training_command_leaves_a_checkpoint_and_the_student(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "addsr_pl.train", "model=tiny", "data=sample", "trainer=cpu",
        "trainer.max_steps=4", f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "student" / "addsr_student.json").is_file()
    assert f"Exported student: {run / 'student'}" in done.stdout
    # one bar over the run's 4 iterations with its losses and rate
    # (text mode reads tqdm's carriage returns as line ends)
    last_bar = [line for line in done.stdout.splitlines() if line.startswith("iteration:")][-1]
    assert "4/4" in last_bar and "it/s" in last_bar, last_bar
    assert "loss_g=" in last_bar and "loss_d=" in last_bar, last_bar
    assert "Epoch" not in done.stdout + done.stderr
    # checkpoints are read weights-only; Lightning's note on how it saves them would say otherwise
    assert "weights_only` was not set" not in done.stdout + done.stderr
    # the end of the run in iterations, not in Lightning's optimizer steps (2 per iteration)
    assert "`trainer.max_steps=4` iterations reached" in done.stdout + done.stderr
    assert "max_steps=8" not in done.stdout + done.stderr
    # one CSV per run: the csv logger's metrics.csv
    assert sorted(run.rglob("*.csv")) == [run / "csv" / "version_0" / "metrics.csv"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 4
    # frozen teacher, VAE and text encoder reload from their folders: not in the checkpoint
    assert not any(k.startswith(("teacher.", "codec.", "conditioner.")) for k in ckpt["state_dict"])
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    assert any(k.startswith("discriminator.heads.") for k in ckpt["state_dict"])


def test_the_max_steps_message_counts_iterations(caplog):
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    with caplog.at_level(logging.INFO), stop_message_in_iterations("addsr"):
        rank_zero_info("`Trainer.fit` stopped: `max_steps=8` reached.")
        rank_zero_info("`Trainer.fit` stopped: `max_epochs=3` reached.")
    rank_zero_info("`Trainer.fit` stopped: `max_steps=6` reached.")  # outside a run of ours: Lightning's
    assert caplog.messages == [
        "Training stopped: `trainer.max_steps=4` iterations reached.",
        "`Trainer.fit` stopped: `max_epochs=3` reached.",
        "`Trainer.fit` stopped: `max_steps=6` reached.",
    ]


class GradientIsolation(pl.Callback):
    """Before each optimizer step: the other network must have no gradient at all."""

    def __init__(self):
        self.checked = {"g": 0, "d": 0}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        opt_g, opt_d = module.optimizers(use_pl_optimizer=False)
        if optimizer is opt_g:
            assert all(p.grad is None or not p.grad.any() for p in module.discriminator.parameters())
            assert any(p.grad is not None for _, p in module.student_trainable())
            self.checked["g"] += 1
        else:
            assert all(p.grad is None or not p.grad.any() for p in module.student.parameters())
            assert any(p.grad is not None for _, p in module.discriminator_trainable())
            self.checked["d"] += 1


def fit(cfg, module, callbacks=()):
    trainer = build_trainer(cfg, [*build_callbacks(cfg), *callbacks], [])
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return trainer


def test_training_moves_only_the_trainable_weights_and_never_crosses_g_and_d(make_cfg):
    cfg = make_cfg([*FAST, "trainer.max_steps=3"])
    module = AddSRModule(**to_dicts(cfg))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    isolation = GradientIsolation()
    fit(cfg, module, [isolation])
    assert isolation.checked == {"g": 3, "d": 3}
    trainable = {f"student.{n}" for n, _ in module.student_trainable()}
    after = module.state_dict()
    changed = {
        k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])
    }
    for prefix in (
        "teacher.",
        "codec.",
        "conditioner.",
        "discriminator.backbone.",
        "discriminator.conditioner.",
    ):
        assert not any(k.startswith(prefix) for k in changed), prefix
    frozen_student = {f"student.{n}" for n, _ in module.student.named_parameters()} - trainable
    assert not (changed & frozen_student)
    assert trainable & changed == trainable  # every trainable weight moved (AdamW moves all of them)
    assert any(k.startswith("discriminator.heads.") for k in changed)
    assert any(k.startswith("ema.") for k in changed)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.losses[int(module.iteration)] = (float(m["train/loss_g"]), float(m["train/loss_d"]))


def test_resuming_from_a_mid_run_checkpoint_reproduces_the_next_losses(make_cfg):
    straight = LossRecorder()
    cfg = make_cfg(
        [*FAST, "trainer.max_steps=4", "callbacks.checkpoint.every_n_iterations=2"], sub="straight"
    )
    fit(cfg, AddSRModule(**to_dicts(cfg)), [straight])
    mid_run = f"{cfg.paths.output_dir}/checkpoints/step4.ckpt"  # 2 iterations = 4 optimizer steps

    again = make_cfg([*FAST, "trainer.max_steps=4"], sub="resumed")
    resumed = LossRecorder()
    trainer = build_trainer(again, [*build_callbacks(again), resumed], [])
    trainer.fit(AddSRModule(**to_dicts(again)), datamodule=instantiate(again.data), ckpt_path=mid_run)
    assert sorted(resumed.losses) == [3, 4]
    for it in (3, 4):
        assert resumed.losses[it] == pytest.approx(straight.losses[it], rel=1e-6, abs=1e-7), it


def test_the_exported_student_matches_the_in_memory_ema_student(make_cfg, sample_pair):
    cfg = make_cfg([*FAST, "trainer.max_steps=2", "method.ema_decay=0.5"])
    result = train(cfg)
    module = result["module"]
    loaded = AddSRPipeline.from_folder(result["student"])
    hr, lr = sample_pair
    name, trained = module.student_trainable()[0]
    assert not torch.equal(module.ema.shadow(name), trained)  # EMA and trained weights differ after training
    with module.ema.swapped_in():
        expected = module.student_pipeline(4)(lr, generator=torch.Generator().manual_seed(3))
    raw = module.student_pipeline(4)(lr, generator=torch.Generator().manual_seed(3))
    got = loaded(lr, generator=torch.Generator().manual_seed(3))
    assert got.shape == (1, 3, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, raw, atol=1e-6)  # the export holds the EMA, not the raw trained weights


def test_bf16_mixed_runs_frozen_parts_in_bf16_and_keeps_trained_weights_fp32(make_cfg):
    cfg = make_cfg([*FAST, "trainer.max_steps=1", "trainer.precision=bf16-mixed"])
    module = AddSRModule(**to_dicts(cfg))
    fit(cfg, module)
    assert int(module.iteration) == 1
    assert all(p.dtype == torch.float32 for _, p in module.student_trainable())
    assert all(p.dtype == torch.float32 for _, p in module.discriminator_trainable())
    for frozen in (module.teacher, module.codec, module.discriminator.backbone):
        assert all(p.dtype == torch.bfloat16 for p in frozen.parameters())
    frozen_student = [p for p in module.student.parameters() if not p.requires_grad]
    assert frozen_student and all(p.dtype == torch.bfloat16 for p in frozen_student)


@pytest.mark.gpu
def test_tiny_training_on_cuda_in_bf16(make_cfg):
    cfg = make_cfg([*FAST, "trainer=gpu", "trainer.max_steps=2"])
    module = AddSRModule(**to_dicts(cfg))
    fit(cfg, module)
    assert int(module.iteration) == 2 and module.device.type == "cuda"
