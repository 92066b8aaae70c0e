"""Multirun sweeps: one job folder and one offline wandb run per job, one group per sweep, crashed jobs
marked failed; the ablation grid and the SLURM preset compose."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from addsr_pl.config import validate
from addsr_pl.evaluation.sweeps import job_metrics, wandb_records
from addsr_pl.paths import config_dir
from addsr_pl.train import train

from conftest import compose_train

FAST = [
    "data.crop_size=32",
    "data.batch_size=1",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "export_student=false",
]


def offline_run(job_dir: Path, patience_s: float = 60.0) -> dict:
    """The job's single offline run: id, name, group, merged config, exit code, logged metric keys.

    wandb's service process writes the log asynchronously; a finished run's log ends with its exit
    record, so read until that record is there (or `patience_s` has passed).
    """
    deadline = time.monotonic() + patience_s
    while True:
        run = parse_offline_run(job_dir)
        if (run is not None and run["exit_code"] is not None) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert run is not None, f"{job_dir}: no wandb run"
    return run


def parse_offline_run(job_dir: Path) -> dict | None:
    files = list(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) <= 1, f"{job_dir}: {len(files)} wandb runs"
    if not files:
        return None
    run = {"config": {}, "exit_code": None, "history": set()}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"id": record.run.run_id, "name": record.run.display_name, "group": record.run.run_group}
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            run["history"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            continue
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
            continue
        else:
            continue
        run["config"] |= {u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in updates}
    return run


def multirun(sweep_dir: Path, cache_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "addsr_pl.train", "-m", "model=tiny", "trainer=cpu", "logger=wandb",
        *FAST, *overrides, f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache_dir}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(sweep_dir.parent / "wandb")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir())


def test_a_2x2_multirun_gives_four_jobs_and_four_wandb_runs_in_one_group(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    done = multirun(sweep, cache_dir, "method.psr=true,false", "method.teacher_condition=hr,lr")
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = job_dirs(sweep)
    common = "data.batch_size=1,data.crop_size=32,model=tiny,trainer.limit_val_batches=0,trainer.max_steps=1,trainer=cpu"
    names = {  # Hydra sorts the overrides by key
        ",".join(sorted([*common.split(","), f"method.psr={psr}", f"method.teacher_condition={cond}"]))
        for psr in ("False", "True")
        for cond in ("hr", "lr")
    }
    assert {job.name for job in jobs} == names  # readable: the job's own overrides, nothing else
    runs = {job.name: offline_run(job) for job in jobs}
    assert len({run["id"] for run in runs.values()}) == 4
    assert {run["group"] for run in runs.values()} == {f"train/{sweep.name}"}
    for name, run in runs.items():
        assert run["name"] == name
        assert run["exit_code"] == 0
        method = run["config"]["method"]
        assert f"method.psr={method['psr']}" in name
        assert f"method.teacher_condition={method['teacher_condition']}" in name
        assert run["config"]["paths"]["output_dir"] == str(sweep / name)  # the resolved config
        assert {"train/loss_dis", "train/loss_d", "train/ta_weight"} <= run["history"]
        # what the sweep notebook reads from a wandb sweep (it has no metrics.csv)
        logged = job_metrics(sweep / name)
        assert {"train/loss_dis", "train/loss_d", "train/ta_weight"} <= logged.keys()


def test_a_crashed_job_is_marked_failed_and_the_next_job_gets_its_own_run(make_cfg, monkeypatch):
    """Hydra's basic launcher runs the jobs of a multirun one after another in one process, as here."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    # an argument the optimizer does not take passes start-up validation (a `_target_`'s arguments are
    # open) and fails inside Lightning's fit, when the optimizer is built
    crashing = make_cfg(["logger=wandb", *FAST, "+method.optimizer_g.momentum_decay=0.5"], sub="crashing")
    with pytest.raises(InstantiationException, match="momentum_decay"):
        train(crashing)
    assert wandb.run is None
    healthy = make_cfg(["logger=wandb", *FAST], sub="healthy")
    train(healthy)
    crashed, next_run = (
        offline_run(Path(crashing.paths.output_dir)),
        offline_run(Path(healthy.paths.output_dir)),
    )
    assert crashed["exit_code"] == 1
    assert next_run["exit_code"] == 0
    assert crashed["id"] != next_run["id"]
    assert crashed["config"]["method"]["optimizer_g"]["momentum_decay"] == 0.5
    assert next_run["config"]["method"]["optimizer_g"]["lr"] == 2e-5
    assert "train/loss_dis" in next_run["history"] and "train/loss_dis" not in crashed["history"]


def test_the_ablation_search_expands_to_the_psr_ta_teacher_grid(tmp_path, cache_dir):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=ablation"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {
        "method.psr": "true,false",
        "method.ta_schedule": "exponential,linear,none",
        "method.teacher_condition": "hr,lr",
    }
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert len(jobs) == 12 and len({tuple(job) for job in jobs}) == 12
    for i, job in enumerate(jobs):
        validate(compose_train(tmp_path / str(i), ["hparams_search=ablation", *job], cache_dir))


def test_the_slurm_preset_composes_onto_the_submitit_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        default = compose("train", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert default.hydra.launcher._target_.endswith("BasicLauncher")


def test_slurm_launcher_without_its_extra_names_the_pip_command(capsys):
    from addsr_pl.train import check_launcher_extras

    try:
        installed = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        pytest.skip("hydra-submitit-launcher is installed here")
    check_launcher_extras(["-m", "hparams_search=ablation", "hydra/launcher=basic"])  # Hydra's own: passes
    with pytest.raises(SystemExit) as stop:
        check_launcher_extras(["-m", "hparams_search=ablation", "hydra/launcher=slurm"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith('pip install -e ".[slurm]"')
