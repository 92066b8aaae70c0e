"""Every resume path is exact or refused: checkpoints read as data, `ckpt_path=last` by iteration, the
run-dir lock, `resume.allow_changes` checked, path-only keys allowed, and no EMA move on a skipped iteration."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from addsr_pl.resume import ResumeError, check_resume, path_keys, resolve_ckpt_path
from addsr_pl.runlock import LOCK_NAME, RunLock, RunLockError, holder_record, process_start_time
from addsr_pl.train import resolved_config, train

from conftest import compose_train

FAST = ["data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]
# checkpoints every iteration: last.ckpt, step2.ckpt and step4.ckpt (Lightning counts 2 steps per iteration)
TWO_ITERATIONS = [*FAST, "trainer.max_steps=2", "callbacks.checkpoint.every_n_iterations=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """A run dir after 2 iterations, with last.ckpt, step2.ckpt and step4.ckpt."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(run, TWO_ITERATIONS, cache_dir))
    return run


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    """`cp -r` of the run dir: every file gets a new modification time."""
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run, copy_function=shutil.copy)
    return run


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


class Payload:
    """Unpickling this creates a marker file: what a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def damaged_copies(good: Path, folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Damaged versions of `good`, each with the problem its refusal must name."""
    data = good.read_bytes()
    flipped = bytearray(data)
    middle = len(data) // 2  # inside the tensors' records: the archive's structure stays readable
    flipped[middle : middle + 64] = bytes(b ^ 0xFF for b in flipped[middle : middle + 64])
    files = {
        "empty": (b"", "empty file"),
        "truncated": (data[: len(data) // 2], "not a torch zip archive"),
        "not_torch": (b"addsr" * 1000, "not a torch zip archive"),
        "flipped": (bytes(flipped), "damaged"),
    }
    out = {}
    for name, (content, problem) in files.items():
        path = folder / f"{name}.ckpt"
        path.write_bytes(content)
        out[name] = (path, problem)
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "extra": Payload(marker)}, folder / "payload.ckpt")
    out["payload"] = (folder / "payload.ckpt", "holds a pickled object (")
    return out


def test_damaged_and_crafted_checkpoints_are_refused_in_one_line_and_never_run(
    trained_run, tmp_path, cache_dir
):
    marker = tmp_path / "payload_ran"
    good = trained_run / "checkpoints" / "last.ckpt"
    for name, (path, problem) in damaged_copies(good, tmp_path, marker).items():
        run = tmp_path / f"run_{name}"
        cfg = compose_train(run, [*FAST, "trainer.max_steps=3", f"ckpt_path={path}"], cache_dir)
        with pytest.raises(ResumeError) as refused:
            train(cfg)
        message = one_line(refused.value)
        assert str(path) in message and problem in message, (name, message)
        assert not marker.exists(), name
        assert not (run / LOCK_NAME).exists(), name  # released on the way out
        assert not (run / "checkpoints").exists(), name  # nothing trained
    # found by ckpt_path=last: refused the same way
    run = copy_run(trained_run, tmp_path)
    (run / "checkpoints" / "step4.ckpt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ResumeError, match=r"step4.ckpt: not a torch zip archive"):
        train(compose_train(run, [*FAST, "trainer.max_steps=3", "ckpt_path=last"], cache_dir))


def test_the_training_command_refuses_a_pickle_payload_with_exit_code_2(trained_run, tmp_path, cache_dir):
    marker = tmp_path / "payload_ran"
    payload = damaged_copies(trained_run / "checkpoints" / "last.ckpt", tmp_path, marker)["payload"][0]
    args = [
        "model=tiny", "trainer=cpu", *FAST, "trainer.max_steps=3", f"ckpt_path={payload}",
        f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "addsr_pl.train", *args], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert not marker.exists()
    # (library start-up notices aside) one line, no traceback
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("addsr-pl train:")]
    assert len(errors) == 1 and errors[0].startswith("addsr-pl train: error: checkpoint "), errors
    assert f"{payload}: holds a pickled object" in errors[0]


def test_ckpt_path_last_takes_the_highest_iteration_not_the_newest_file(trained_run, tmp_path, cache_dir):
    run = copy_run(trained_run, tmp_path)
    ckpts = run / "checkpoints"
    # a stale SLURM checkpoint (iteration 1) written last, and no last.ckpt (save_last=false, a
    # kill between saves, a deleted file): the newest by file time is the oldest by iteration
    shutil.copy(ckpts / "step2.ckpt", run / "hpc_ckpt_1.ckpt")
    (ckpts / "last.ckpt").unlink()
    os.utime(ckpts / "step4.ckpt", (1, 1))
    cfg = compose_train(run, [*FAST, "trainer.max_steps=3", "ckpt_path=last"], cache_dir)
    assert resolve_ckpt_path(cfg) == str(ckpts / "step4.ckpt")
    result = train(cfg)
    assert int(result["module"].iteration) == 3
    resumed = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["nonfinite"]["skipped"] == 0


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_train(run, [*FAST, "trainer.max_steps=1"], cache_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {**holder_record(), "pid": holder.pid, "pid_start": process_start_time(holder.pid)}
        (run / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(RunLockError) as refused:
            train(cfg)
        assert f"PID {holder.pid}" in one_line(refused.value) and "in use by a live run" in str(refused.value)
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (a kill -9 leaves its lock behind): the next run takes the lock over
    result = train(cfg)
    assert int(result["module"].iteration) == 1
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_a_lock_of_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path):
    path = tmp_path / LOCK_NAME
    other = {**holder_record(), "host": f"not-{socket.gethostname()}", "pid": 1}
    path.write_text(json.dumps(other))
    with pytest.raises(RunLockError, match="host not-"):
        RunLock(tmp_path, heartbeat_s=60, stale_after_s=600).acquire()
    old = time.time() - 601
    os.utime(path, (old, old))
    lock = RunLock(tmp_path, heartbeat_s=0.05, stale_after_s=600)
    with lock:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5  # the heartbeat keeps it fresh
    assert not path.exists()


def test_unknown_allow_changes_keys_are_refused_and_paths_may_change(trained_run, tmp_path, cache_dir):
    cfg = compose_train(tmp_path / "fresh", [*FAST, "resume.allow_changes=[method.optimzer_g.lr]"], cache_dir)
    with pytest.raises(ResumeError) as refused:
        train(cfg)
    assert "'method.optimzer_g.lr'; did you mean method.optimizer_g.lr?" in one_line(refused.value)

    # the cache folder moved (paths.cache_dir, interpolated into model.components.cache_dir): allowed
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    moved = compose_train(tmp_path / "moved", [*FAST, f"ckpt_path={ckpt}"], tmp_path / "elsewhere")
    assert "model.components.cache_dir" in path_keys(moved)
    changes = check_resume(ckpt, resolved_config(moved), [], path_keys(moved))
    assert changes == {"model.components.cache_dir": (str(cache_dir), str(tmp_path / "elsewhere"))}
    # a key set by hand, not from paths.*, is still compared
    seeded = compose_train(tmp_path / "seeded", [*FAST, "seed=7"], cache_dir)
    with pytest.raises(ResumeError, match="seed: 42 -> 7"):
        check_resume(ckpt, resolved_config(seeded), [], path_keys(seeded))


class EmaAround(pl.Callback):
    """The EMA shadows before the first micro-step of `iteration` (1-based) and after its last."""

    def __init__(self, iteration: int):
        self.iteration, self.before, self.after = iteration, None, None

    def shadows(self, module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.ema.state_dict().items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.iteration) == self.iteration - 1 and self.before is None:
            self.before = self.shadows(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.iteration) == self.iteration and self.after is None:
            self.after = self.shadows(module)


def test_a_skipped_iteration_moves_no_ema_when_it_follows_every_micro_step(make_cfg, monkeypatch):
    """`ema_every=micro_step` with accumulation 2 and D first; `ema_every=iteration`
    is covered by test_fault_tolerance's NaN test."""
    import addsr_pl.train as train_module

    around = {1: EmaAround(1), 2: EmaAround(2)}
    build = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build(cfg), *around.values()])
    cfg = make_cfg([
        *FAST, "trainer.max_steps=2", "fault.nan_loss_at_iteration=2", "method.ema_every=micro_step",
        "method.accumulate_grad_batches=2", "method.gd_order=discriminator_first",
    ])  # fmt: skip
    result = train(cfg)
    assert result["metrics"]["train/nonfinite_skipped"] == 1.0
    # (at iteration 1 the shadows still equal the weights: an update there would not show)
    moved, skipped = around[1], around[2]
    for key, shadow in skipped.before.items():
        assert torch.equal(shadow, skipped.after[key]), key
    assert any(not torch.equal(moved.before[k], moved.after[k]) for k in moved.before)


def test_a_checkpoint_from_before_the_speed_and_plan_keys_resumes_and_other_changes_are_still_refused():
    """Older checkpoints hold memory.compile_student and the plan's levers as true/2, and no method.speed:
    how fast and in how much memory is not what is computed. The effective batch and the maths stay compared."""
    from addsr_pl.resume import changed_keys

    current = {
        "method": {
            "speed": {"compile": "auto"},
            "memory": {"gradient_checkpointing": "auto", "teacher_decode_chunk": "auto", "micro_batch": "auto",
                       "plan": "auto", "ema_dtype": "float32"},
            "accumulate_grad_batches": 1,
        },
        "data": {"batch_size": 6},
    }  # fmt: skip
    saved = {
        "method": {
            "memory": {"gradient_checkpointing": True, "teacher_decode_chunk": 2, "compile_student": False,
                       "compile_options": {}, "ema_dtype": "float32"},
            "accumulate_grad_batches": 1,
        },
        "data": {"batch_size": 6},
    }  # fmt: skip
    assert changed_keys(saved, current) == []
    saved["method"]["memory"]["ema_dtype"] = "bfloat16"
    saved["data"]["batch_size"] = 3
    assert changed_keys(saved, current) == ["data.batch_size", "method.memory.ema_dtype"]
