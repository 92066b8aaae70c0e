"""Every experiment file is one cell of the paper's ablations: it composes with the tiny preset, differs
from the paper's setting in exactly its ablated keys, and trains a step."""

import json
import math

import pytest
from omegaconf import OmegaConf

from addsr_pl.config import validate
from addsr_pl.paths import config_dir
from addsr_pl.train import train

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))

# What each cell changes relative to the paper's setting (experiment=addsr).
CELLS = {
    "addsr": {},
    "tab4_teacher_hr": {},
    "tab4_teacher_lr": {"teacher_condition": "lr"},
    "tab4_control_hr_prompt_lr": {"teacher_prompt_source": "lr"},
    "tab4_control_lr_prompt_hr": {"teacher_control_image": "lr"},
    "tab5_psr_on": {},
    "tab5_psr_off": {"psr": False},
    "tab6_ta_on": {},
    "tab6_ta_off": {"ta_schedule": "none"},
    "ta_exponential": {},
    "ta_linear": {"ta_schedule": "linear"},
    "ta_none": {"ta_schedule": "none"},
    "ta_official_indexing": {"ta_indexing": "official"},
}
FAST = [
    "data.crop_size=32",
    "data.batch_size=1",
    "trainer.limit_val_batches=0",
    "trainer.max_steps=1",
    "export_student=false",
]


def method_of(cfg) -> dict:
    return OmegaConf.to_container(cfg.method, resolve=True)


def test_every_experiment_file_is_a_known_cell():
    assert sorted(CELLS) == EXPERIMENTS


def test_the_paper_setting_is_the_method_default(make_cfg):
    assert method_of(make_cfg(["experiment=addsr"], sub="paper")) == method_of(make_cfg([], sub="default"))


# one training step per distinct method setting; cells with a setting already trained only compose
_trained: dict[str, str] = {}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_changes_only_its_cell_and_trains_one_step(name, make_cfg):
    paper = method_of(make_cfg(["experiment=addsr"], sub="paper"))
    cfg = make_cfg([f"experiment={name}", *FAST], sub=name)
    validate(cfg)
    assert method_of(cfg) == paper | CELLS[name]
    assert cfg.task_name == name  # its own run folder and wandb fallback name
    key = json.dumps(method_of(cfg), sort_keys=True)
    if key in _trained:
        return
    result = train(cfg)
    assert int(result["module"].iteration) == 1
    assert math.isfinite(result["metrics"]["train/loss_dis"])
    _trained[key] = name
