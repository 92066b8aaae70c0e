"""Two-process DDP on CPU (gloo), as `trainer=ddp` runs on GPUs: validation, a NaN, SIGTERM, resume.

Every run is a subprocess in its own process group, killed whole on timeout, so a deadlock fails
the test within minutes instead of hanging it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import output_or_kill

PREEMPTED_EXIT_CODE = 143  # conf/callbacks/default.yaml: preemption.exit_code
TIMEOUT_S = 240


def ddp_args(run: Path, cache_dir, preset: str = "ddp") -> list[str]:
    return [
        sys.executable, "-m", "addsr_pl.train", "model=tiny", f"trainer={preset}", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "data.crop_size=32", "data.batch_size=2", "data.val_batch_size=1",
        f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}",
    ]  # fmt: skip


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> str:
    return output_or_kill(proc, timeout, "DDP run")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ddp_pre_emption_then_resume_with_validation_and_a_nan_loss(tmp_path, cache_dir):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # 1. a long run, pre-empted by SIGTERM to the launching process once it has saved an iteration
    proc = start([*ddp_args(run, cache_dir), "trainer.max_steps=200", "trainer.limit_val_batches=0",
                  "callbacks.checkpoint.every_n_iterations=1"])  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while not list(ckpts.glob("step*.ckpt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint appeared:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-4000:]
    assert not group_alive(proc.pid), "a rank outlived the pre-empted launcher"
    assert "SIGTERM received" in out and not (run / "student").exists()
    stopped_at = int(torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]["iteration"])
    assert 1 <= stopped_at < 200

    # 2. resume to stopped_at + 4 with validation on every epoch (2 iterations per epoch on 2 ranks)
    #    and one NaN distillation loss on rank 0 at the next iteration: both ranks skip it together
    target, nan_at = stopped_at + 4, stopped_at + 1
    proc = start([*ddp_args(run, cache_dir), f"trainer.max_steps={target}", "ckpt_path=last",
                  "trainer.limit_val_batches=1", f"fault.nan_loss_at_iteration={nan_at}"])  # fmt: skip
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    # each rank's log: rank 0 met the NaN, rank 1 its average in the all-reduced gradients; both skip
    logs = {0: (run / "train.log").read_text(), 1: (run / "train_ddp_process_1.log").read_text()}
    assert f"Iteration {nan_at}: non-finite loss_dis, grad_g on rank 0" in logs[0]
    for rank, text in logs.items():
        skips = [line for line in text.splitlines() if "both optimizer steps skipped" in line]
        assert len(skips) == 1 and f"Iteration {nan_at}: " in skips[0] and f"on rank {rank}" in skips[0], rank
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == target and ckpt["nonfinite"]["skipped"] == 1
    resumed_log = sorted(run.glob("csv/version_*/metrics.csv"))[-1].read_text().splitlines()
    psnr = resumed_log[0].split(",").index("val/psnr_1step")
    assert any(row.split(",")[psnr] for row in resumed_log[1:])  # validation ran (and did not deadlock)
    for part in ("unet", "controlnet"):
        for file in (run / "student" / part).glob("*.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(file).values())


def student_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("student.", "ema."))}


@pytest.mark.slow  # two two-process runs
def test_ddp_zero_saves_the_optimizer_state_whole_and_resumes_exactly(tmp_path, cache_dir):
    # a learning rate at which every iteration moves the weights far past the tolerance below, so a
    # skipped or repeated batch after the resume would show
    lr = ["method.optimizer_g.lr=1e-2", "method.optimizer_d.lr=1e-2", "trainer.limit_val_batches=0"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    # two iterations at once, with a checkpoint after each (step2.ckpt: iteration 1, in optimizer steps)
    proc = start([*ddp_args(straight, cache_dir, "ddp_zero"), *lr, "trainer.max_steps=2",
                  "callbacks.checkpoint.every_n_iterations=1"])  # fmt: skip
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    # checkpoints are read weights-only: the ZeRO state holds plain containers (no omegaconf types)
    ckpt = torch.load(straight / "checkpoints" / "step2.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 1
    # consolidated on rank 0: one AdamW state per trainable parameter, as without sharding
    trainable_g = sum(1 for k in ckpt["state_dict"] if k.startswith("student."))
    state_g = ckpt["optimizer_states"][0]["state"]
    assert len(state_g) == trainable_g and all("exp_avg" in s for s in state_g.values())
    assert (straight / "student" / "addsr_student.json").is_file()

    # the run as a stop after iteration 1 leaves it: its checkpoints up to there, no last.ckpt (so
    # ckpt_path=last takes the highest iteration), resumed to iteration 2 by the documented command
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy2(straight / "checkpoints" / "step2.ckpt", run / "checkpoints" / "step2.ckpt")
    proc = start([*ddp_args(run, cache_dir, "ddp_zero"), *lr, "trainer.max_steps=2", "ckpt_path=last",
                  "callbacks.checkpoint.every_n_iterations=1"])  # fmt: skip
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    at_once = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(resumed["state_dict"]["iteration"]) == int(at_once["state_dict"]["iteration"]) == 2
    a, b, first = student_state(resumed), student_state(at_once), student_state(ckpt)
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - first[k]).abs().max().item() for k in a) > 1e-3  # one iteration moves this much


def test_a_signal_during_ddp_start_up_stops_every_rank_with_the_pre_emption_exit_code(tmp_path):
    """`setup`: both ranks started and connected (the launcher used to die by the signal, leaving rank 1
    behind); `train_start`: after Lightning's handler would have been set, before the pre-emption
    callback's start (the run used to exit 0 with no checkpoint). The two runs go at once (each with its
    own cache folder), on another core where there is one."""
    procs = {}
    for when in ("setup", "train_start"):
        run = tmp_path / when
        # a rank already in the training loop is not waited for as after a pre-emption (600 s > TIMEOUT_S)
        procs[when] = start([*ddp_args(run / "run", run / "cache"), "trainer.max_steps=50",
                             "trainer.limit_val_batches=0", f"fault.signal_at={when}",
                             "callbacks.preemption.rank_exit_timeout_s=600"])  # fmt: skip
    try:
        for when, proc in procs.items():
            run = tmp_path / when / "run"
            out = finish(proc)
            assert proc.returncode == PREEMPTED_EXIT_CODE, f"{when}: {out[-4000:]}"
            assert not group_alive(proc.pid), f"{when}: a rank outlived the launcher"
            assert "SIGTERM received outside the training loop; stopping." in out, when
            assert not (run / "student").exists() and not (run / "run.lock").exists(), when
    finally:  # the other run is not left behind by a failed check
        for proc in procs.values():
            if group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)


def test_each_optimizer_step_all_reduces_the_trained_gradients_once(tmp_path, cache_dir):
    """The student's and the discriminator's DDP wrappers: per iteration of 2 accumulated micro-steps, the
    bytes through the all-reduce (counted by the communication hook, logged as train/allreduce_mib) are
    those of the trained weights' fp32 gradients, once; no frozen weight is reduced."""
    from addsr_pl.method.module import AddSRModule

    from conftest import compose_train, to_dicts

    run = tmp_path / "run"
    proc = start([*ddp_args(run, cache_dir), "trainer.max_steps=2", "trainer.limit_val_batches=0",
                  "method.accumulate_grad_batches=2"])  # fmt: skip
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    module = AddSRModule(**to_dicts(compose_train(tmp_path / "compose", [], cache_dir)))
    trained = sum(p.numel() for _, p in module.student_trainable()) + sum(
        p.numel() for _, p in module.discriminator_trainable()
    )
    rows = [line.split(",") for line in (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()]
    column, iteration = rows[0].index("train/allreduce_mib"), rows[0].index("train/iteration")
    logged = [(float(r[iteration]), float(r[column])) for r in rows[1:] if r[column]]
    after_an_iteration = [mib for it, mib in logged if it >= 1]
    assert len(after_an_iteration) >= 2
    assert after_an_iteration == pytest.approx([trained * 4 / 2**20] * len(after_an_iteration), rel=1e-9)
