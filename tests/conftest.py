"""Shared fixtures: configs composed from the real tree, tiny models, CPU, outputs under tmp_path."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from addsr_pl.paths import config_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch threads: at most 2, and the cores shared among pytest-xdist's workers (`make test` runs one per
# core), so two workers on two cores do not each split their kernels over both
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))


def compose_train(tmp_path, overrides: list[str] | None = None, cache_dir=None) -> DictConfig:
    """The training config as `python -m addsr_pl.train model=tiny trainer=cpu ...` would compose it."""
    base = ["model=tiny", "trainer=cpu", "logger=csv", f"hydra.run.dir={tmp_path}"]
    if cache_dir is not None:
        base.append(f"paths.cache_dir={cache_dir}")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides or []), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    def make(overrides: list[str] | None = None, sub: str = "run") -> DictConfig:
        path = tmp_path / sub
        path.mkdir(exist_ok=True)
        return compose_train(path, overrides, cache_dir)

    return make


def to_dicts(cfg: DictConfig) -> dict:
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "conditioning": OmegaConf.to_container(cfg.conditioning, resolve=True),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "seed": int(cfg.seed),
    }


@pytest.fixture
def sample_pair():
    """An HR crop of a bundled photo and its bicubic x4 LR, [1, 3, 64, 64] / [1, 3, 16, 16] in [0, 1]."""
    from skimage import data

    hr = torch.from_numpy(data.astronaut()[100:228:2, 150:278:2].copy()).permute(2, 0, 1).float() / 255
    hr = hr.unsqueeze(0)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    return hr, lr


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextmanager
def one_thread():
    """Torch on one thread inside: CPU kernels split their sums by thread count, so bit-exact results
    (tests/test_golden.py) need the same count whatever the suite runs with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, cache_dir):
    """An exported tiny student (two training iterations on the sample photos, on one thread: its
    weights are bit-exact, see tests/test_golden.py)."""
    from addsr_pl.train import train

    run = tmp_path_factory.mktemp("student_run")
    cfg = compose_train(
        run, ["data.crop_size=32", "trainer.max_steps=2", "trainer.limit_val_batches=0"], cache_dir
    )
    with one_thread():
        return train(cfg)["student"]


def output_or_kill(proc, timeout: float, what: str) -> str:
    """The output of `proc` (started with `start_new_session=True`); past `timeout` its whole process
    group is killed and the test fails, so a deadlock never hangs the suite."""
    import os
    import signal
    import subprocess

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout} s (deadlock?):\n{out[-4000:]}")
    return out
