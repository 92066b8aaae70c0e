"""Fault tolerance on one process: non-finite iterations, exact or refused resume, atomic checkpoints."""

import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from safetensors.torch import load_file

from addsr_pl.method.checkpointing import AtomicCheckpointIO
from addsr_pl.method.export import export_student
from addsr_pl.method.module import AddSRModule
from addsr_pl.method.nonfinite import NonFiniteLossError
from addsr_pl.resume import ResumeError
from addsr_pl.train import build_loggers, train

from conftest import output_or_kill, to_dicts

FAST = ["data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]


def start_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m addsr_pl.train ARGS` started in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "addsr_pl.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )


def finish_cli(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """The finished command's output; past `timeout` its process group is killed whole."""
    out = output_or_kill(proc, timeout, "the training command")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_cli(
    args: list[str], timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return finish_cli(start_cli(args, env), timeout)


def student_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for part in ("unet", "controlnet"):
        for file in sorted((folder / part).glob("*.safetensors")):
            weights |= {f"{part}.{k}": v for k, v in load_file(file).items()}
    return weights


def metrics_rows(run: Path) -> list[dict]:
    """The CSV logger's rows of every launch into this run dir (one version folder each)."""
    rows = []
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def trained_state(module) -> dict[str, torch.Tensor]:
    """Student and discriminator weights, EMA, and both optimizers' moments."""
    state = {
        k: v.detach().clone()
        for k, v in module.state_dict().items()
        if k in module.trained_state_keys() - {"iteration"}  # the counter moves on a skipped iteration too
    }
    for i, opt in enumerate(module.optimizers(use_pl_optimizer=False)):
        for j, s in enumerate(opt.state.values()):
            state |= {f"opt{i}.{j}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)}
    return state


class StateAround(pl.Callback):
    """The trained state before and after one iteration (1-based)."""

    def __init__(self, iteration: int):
        self.iteration, self.before, self.after = iteration, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.iteration) == self.iteration - 1:
            self.before = trained_state(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.iteration) == self.iteration:
            self.after = trained_state(module)


def test_a_nan_loss_skips_both_steps_of_its_iteration_and_the_run_goes_on(make_cfg, monkeypatch):
    import addsr_pl.train as train_module

    around = {2: StateAround(2), 3: StateAround(3)}
    build = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build(cfg), *around.values()])
    cfg = make_cfg([*FAST, "trainer.max_steps=3", "fault.nan_loss_at_iteration=2"])
    result = train(cfg)

    skipped, moved = around[2], around[3]
    assert skipped.before.keys() == skipped.after.keys() and any(
        k.startswith("opt1.") for k in skipped.before
    )
    # no weight, EMA or optimizer moment moved at iteration 2 (spectral norm's power-iteration
    # vectors, `*_u` and `*_v`, advance at every forward from the weights alone, as they always do)
    for key in [k for k in skipped.before if not k.endswith(("_u", "_v"))]:
        assert torch.equal(skipped.before[key], skipped.after[key]), key
    assert any(not torch.equal(moved.before[k], moved.after[k]) for k in moved.before if k.startswith("ema."))
    assert result["metrics"]["train/nonfinite_skipped"] == 1.0
    assert int(result["module"].iteration) == 3
    student = student_weights(Path(result["student"]))
    assert student and all(torch.isfinite(v).all() for v in student.values())
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["nonfinite"] == {"skipped": 1, "consecutive": 0}

    # per-step losses appear only at the iterations whose graded step they are
    rows = metrics_rows(Path(cfg.paths.output_dir))
    per_step = [k for k in rows[0] if k.startswith("train/loss_dis_step")]
    logged = [(r["step"], k) for r in rows for k in per_step if r[k]]
    assert 0 < len(logged) < 3 * len(per_step)  # never all steps at every iteration
    assert len(set(logged)) == len(logged)  # no step's value written twice at one iteration
    # (before, a step's last value was repeated at every later iteration)
    for k in per_step:
        values = [r[k] for r in rows if r[k]]
        assert len(values) == len(set(values)), k


def test_consecutive_non_finite_iterations_stop_the_run(make_cfg):
    cfg = make_cfg(
        [*FAST, "trainer.max_steps=3", "fault.nan_loss_at_iteration=1", "method.max_consecutive_nonfinite=1"]
    )
    with pytest.raises(
        NonFiniteLossError, match="1 consecutive iterations .*method.max_consecutive_nonfinite"
    ):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "student").exists()


def test_export_refuses_a_non_finite_student(make_cfg, tmp_path):
    cfg = make_cfg(FAST)
    module = AddSRModule(**to_dicts(cfg))
    name = next(iter(dict(module.ema.named_buffers())))
    getattr(module.ema, name).view(-1)[0] = math.inf
    with pytest.raises(NonFiniteLossError, match=f"EMA student holds non-finite values .*{name}"):
        export_student(module, tmp_path / "student", 4, {"psr": True, "psr_weight": 0.4})
    assert not (tmp_path / "student").exists()


def test_the_readme_resume_flow_from_max_steps_equals_one_uninterrupted_run(tmp_path, cache_dir):
    """4 iterations, then `ckpt_path=last` to 8 in the same run dir == 8 iterations at once."""
    common = [
        "model=tiny", "trainer=cpu", *FAST, "trainer.enable_progress_bar=false",
        "method.optimizer_g.lr=1e-3", "method.optimizer_d.lr=1e-3",
    ]  # fmt: skip
    # the uninterrupted run goes on meanwhile, on a second core where there is one: one thread each (the
    # same in all three runs, so their sums round alike) and its own cache folder (the tiny tokenizer is
    # written there)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight_proc = start_cli(
        [
            *common,
            f"paths.cache_dir={tmp_path / 'cache_b'}",
            "trainer.max_steps=8",
            f"hydra.run.dir={tmp_path / 'b'}",
        ],
        env,
    )
    common.append(f"paths.cache_dir={cache_dir}")
    try:
        first = run_cli([*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'a'}"], env=env)
        assert first.returncode == 0, first.stdout[-3000:]
        resumed = run_cli(
            [*common, "trainer.max_steps=8", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'a'}"], env=env
        )
        assert resumed.returncode == 0, resumed.stdout[-3000:]
    except BaseException:  # the concurrent run is not left behind
        if straight_proc.poll() is None:
            os.killpg(straight_proc.pid, signal.SIGKILL)
        raise
    straight = finish_cli(straight_proc)
    assert straight.returncode == 0, straight.stdout[-3000:]
    for out in (first, resumed, straight):  # no misleading "last model of the previous fit" warnings
        assert "was called without a model" not in out.stdout and "no last checkpoint" not in out.stdout

    a, b = student_weights(tmp_path / "a" / "student"), student_weights(tmp_path / "b" / "student")
    assert a.keys() == b.keys() and a
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 8
    # the losses of iteration 5 (the first after the resume) match
    rows = {r["train/iteration"]: r for r in metrics_rows(tmp_path / "a") if r["train/iteration"]}
    rows_b = {r["train/iteration"]: r for r in metrics_rows(tmp_path / "b") if r["train/iteration"]}
    assert float(rows["5.0"]["train/loss_d"]) == pytest.approx(float(rows_b["5.0"]["train/loss_d"]), abs=1e-6)


def test_a_fresh_start_in_a_run_dir_with_checkpoints_is_refused(make_cfg):
    cfg = make_cfg(FAST)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    ckpt_dir.mkdir()
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, ckpt_dir / "last.ckpt")
    with pytest.raises(
        ResumeError, match=r"already holds checkpoints \(last.ckpt\).*ckpt_path=last.*hydra.run.dir="
    ):
        train(cfg)


def test_resume_refuses_config_changes_and_applies_an_allowed_lr(make_cfg):
    first = make_cfg([*FAST, "trainer.max_steps=1"])
    train(first)
    resume = [*FAST, "trainer.max_steps=2", "ckpt_path=last"]
    for changed in ("method.lambda_adv=0.5", "seed=7", "data.batch_size=3", "method.psr=false"):
        key = changed.split("=")[0]
        with pytest.raises(ResumeError, match=rf"(?s){key}: .* -> .*resume.allow_changes="):
            train(make_cfg([*resume, changed]))
    # the scheduler's state comes back from the checkpoint: refused even when allowed
    with pytest.raises(ResumeError, match="(?s)cannot change"):
        train(
            make_cfg(
                [*resume, "method.lr_scheduler.factor=0.5", "resume.allow_changes=[method.lr_scheduler]"]
            )
        )
    # an allowed lr change is applied over the restored optimizer state; run-length keys pass
    result = train(
        make_cfg([*resume, "method.optimizer_g.lr=1e-3", "resume.allow_changes=[method.optimizer_g.lr]"])
    )
    opt_g, opt_d = result["trainer"].optimizers
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-3) and opt_d.param_groups[0][
        "lr"
    ] == pytest.approx(2e-5)
    assert int(result["module"].iteration) == 2


def test_a_killed_checkpoint_writer_leaves_the_previous_last_ckpt_loadable(tmp_path):
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"iteration": torch.tensor(4)}, target)
    other_fs = tmp_path / "tmpdir"  # stands for a TMPDIR on another filesystem (tmpfs)
    other_fs.mkdir()
    writer = textwrap.dedent(f"""
        import sys, time, torch
        from addsr_pl.method.checkpointing import AtomicCheckpointIO

        class Slow:  # pickled after the big tensor: the file is half written while this sleeps
            def __reduce__(self):
                print("writing", flush=True)
                time.sleep(60)
                return (int, (0,))

        AtomicCheckpointIO().save_checkpoint(
            {{"big": torch.ones(4_000_000), "slow": Slow(), "iteration": torch.tensor(6)}}, {str(target)!r}
        )
    """)
    env = {**os.environ, "TMPDIR": str(other_fs)}
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert list(target.parent.glob("last.ckpt.tmp-*"))  # the unfinished write goes beside the target
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert list(other_fs.iterdir()) == []
    assert int(torch.load(target, weights_only=True)["iteration"]) == 4
    AtomicCheckpointIO().save_checkpoint({"iteration": torch.tensor(8)}, target)  # the orphan is removed
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert int(torch.load(target, weights_only=True)["iteration"]) == 8


def test_unreadable_training_files_are_counted_in_the_logs(make_cfg, tmp_path):
    root = tmp_path / "hr"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    (root / "img_5.png").write_bytes(b"not an image")
    cfg = make_cfg([
        *FAST, "data=folder", f"data.train.root={root}", "data/degradation=bicubic", "data.num_workers=0",
        "data.val_count=0",
        "data.pin_memory=false", "data.persistent_workers=false", "data.max_bad_fraction=0.5", "trainer.max_steps=3",
    ])  # fmt: skip
    train(cfg)
    counts = [
        float(r["train/bad_files_skipped"])
        for r in metrics_rows(Path(cfg.paths.output_dir))
        if r.get("train/bad_files_skipped")
    ]
    assert counts[-1] == 1.0


def test_a_resumed_run_logs_to_the_same_wandb_run(make_cfg):
    cfg = make_cfg(["logger=wandb"])
    first, again = build_loggers(cfg)[0], build_loggers(cfg)[0]
    run_id = (Path(cfg.paths.output_dir) / "wandb_run_id.txt").read_text().strip()
    assert first._wandb_init["id"] == again._wandb_init["id"] == run_id
    assert first._wandb_init["resume"] == "allow"
    other = build_loggers(make_cfg(["logger=wandb"], sub="other"))[0]
    assert other._wandb_init["id"] != run_id
