"""The typed schema of the method, data, model, conditioning and upscale settings: every shipped config
passes it, and a wrong type, a value outside its range or choices, or an unknown key fails at start-up
naming key, value and what is allowed."""

import glob
import subprocess
import sys
from pathlib import Path

import pytest

from addsr_pl.config import ConfigError, check_schema, validate
from addsr_pl.paths import config_dir
from addsr_pl.upscale import defaults

EXPERIMENTS = sorted(Path(p).stem for p in glob.glob(str(config_dir() / "experiment" / "*.yaml")))


@pytest.mark.parametrize(
    "overrides",
    [[], ["stage=teacher"], ["model=tiny_seesr", "conditioning=tiny_ram"], ["hparams_search=ablation"]]
    + [[f"experiment={name}"] for name in EXPERIMENTS],
)
def test_every_shipped_setting_passes(make_cfg, overrides):
    validate(make_cfg(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.psr=maybe", "method.psr = 'maybe': must be true or false"),
        ("method.psr=flase", r"method.psr = 'flase': must be true or false \(did you mean false\?\)"),
        ("method.shared_noise=1", "method.shared_noise = 1: must be true or false"),
        ("+method.psr_wieght=0.5", r"method.psr_wieght: unknown key; did you mean method.psr_weight\?"),
        ("method.lambda_adv=high", "method.lambda_adv = 'high': must be a number >= 0"),
        ("method.ema_decay=1.5", r"method.ema_decay = 1.5: must lie in \[0, 1\]"),
        ("method.loss_divisor=0", "method.loss_divisor = 0: must be > 0"),
        ("data.batch_size=0", "data.batch_size = 0: must be >= 1"),
        ("data.pin_memory=sometimes", "data.pin_memory = 'sometimes': must be true or false"),
        ("data.train.flip=yes", "data.train.flip = 'yes': must be true or false"),
        (
            "conditioning.prompt=tag",
            r"conditioning.prompt = 'tag': must be one of .* \(did you mean 'tags'\?\)",
        ),
        ("model.components.init_seed=0.5", "model.components.init_seed = 0.5: must be an integer"),
        ("model.discriminator.crop_prob=2", r"model.discriminator.crop_prob = 2: must lie in \[0, 1\]"),
    ],
)
def test_bad_types_and_unknown_keys_are_named(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg([override]))


def test_every_problem_is_listed_at_once(make_cfg):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg(["method.psr=maybe", "data.batch_size=0"]))
    assert "method.psr" in str(error.value) and "data.batch_size" in str(error.value)


def test_teacher_stage_checks_its_own_method_keys(make_cfg):
    with pytest.raises(ConfigError, match="method.grad_clip = 'big'"):
        validate(make_cfg(["stage=teacher", "method.grad_clip=big"]))


def test_upscale_defaults_pass_and_bad_values_are_named():
    settings = defaults()
    check_schema(settings, "upscale")
    settings["tiling"]["vae_statistics"] = "global"
    with pytest.raises(ConfigError, match=r"upscale.tiling.vae_statistics = 'global': must be one of"):
        check_schema(settings, "upscale")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.psr=flase"], "method.psr = 'flase': must be true or false (did you mean false?)"),
        (  # checked against the other settings: the lever plan's micro-batch
            ["data.batch_size=4", "method.memory.micro_batch=3"],
            "method.memory.micro_batch = 3: must divide the effective batch "
            "data.batch_size x method.accumulate_grad_batches = 4 ([1, 2, 4]), or be auto",
        ),
    ],
    ids=["psr", "micro_batch"],
)
def test_the_training_command_answers_a_wrong_value_with_one_line_and_exit_code_2(
    tmp_path, overrides, message
):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "addsr_pl.train",
            "model=tiny",
            "trainer=cpu",
            *overrides,
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"addsr-pl train: error: {message}" in done.stderr
    assert "Traceback" not in done.stderr
