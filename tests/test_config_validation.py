"""Each bad config value fails at start-up with a message naming the key, the value and what is allowed."""

import time

import pytest

from addsr_pl.config import ConfigError, validate
from addsr_pl.train import train


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.psr_weight=1.5", r"method.psr_weight = 1.5: must lie in \[0, 1\]"),
        ("method.psr_weight=-0.1", r"method.psr_weight = -0.1: must lie in \[0, 1\]"),
        ("method.student_timesteps=[999,749,749,249]", "method.student_timesteps = .*strictly decreasing"),
        ("method.student_timesteps=[249,499]", "method.student_timesteps = .*strictly decreasing"),
        (
            "method.student_timesteps=[1000,749]",
            r"method.student_timesteps = \[1000, 749\]: every timestep must lie in \[0, 1000\)",
        ),
        ("method.ta_schedule=cosine", "method.ta_schedule = 'cosine': must be one of .*exponential"),
        (
            "method.ta_schedule=[1.0,2.0]",
            r"method.ta_schedule = \[1.0, 2.0\]: a list needs one weight per student timestep \(4\)",
        ),
        ("method.teacher_condition=mid", r"method.teacher_condition = 'mid': must be one of \['hr', 'lr'\]"),
        ("method.unroll_probs=[0.2,0.2,0.2,0.2,0.2]", "method.unroll_probs = .*at most 4 entries"),
        ("method.trainable=everything", "method.trainable = 'everything': must be one of"),
    ],
)
def test_bad_method_values_are_named(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg([override]))


def test_missing_weight_folder_is_named_with_its_key(make_cfg, tmp_path):
    cfg = make_cfg(["model=sd2", f"paths.weights_dir={tmp_path}/nowhere"])
    with pytest.raises(
        ConfigError, match=r"model.components.pretrained_path = '.*nowhere/stable-diffusion-2-base'"
    ):
        validate(cfg)


def test_missing_discriminator_weights_are_named(make_cfg, tmp_path):
    cfg = make_cfg([f"model.discriminator.backbone_weights={tmp_path}/dino.pth"])
    with pytest.raises(ConfigError, match=r"model.discriminator.backbone_weights = .*dino.pth.*no such file"):
        validate(cfg)


def test_train_fails_before_building_anything(make_cfg):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="method.psr_weight"):
        train(make_cfg(["method.psr_weight=2"]))
    assert time.monotonic() - start < 5


def test_missing_ram_folder_is_named(make_cfg, tmp_path):
    cfg = make_cfg(["model=sd2_seesr", "conditioning=ram", f"paths.weights_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"(model.components|conditioning.tagger).* no such file"):
        validate(cfg)
    (tmp_path / "stable-diffusion-2-base").mkdir()
    (tmp_path / "seesr").mkdir()
    with pytest.raises(ConfigError, match=r"conditioning.tagger.folder = '.*/ram': no such file"):
        validate(cfg)


def test_config_imports_what_it_checks_and_nothing_it_checks_imports_config():
    """config.py validates every stage and imports their choices at module level; no module of the method
    imports config back, so there is no import circle to hide in a function-local import."""
    import ast
    from pathlib import Path

    import addsr_pl

    package = Path(addsr_pl.__file__).parent
    tree = ast.parse((package / "config.py").read_text())
    local = [
        node.module
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("addsr_pl")
    ]
    assert local == [], f"config.py imports {local} inside functions"
    back = [
        path.name
        for path in sorted((package / "method").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "addsr_pl.config"
    ]
    assert back == [], f"method/{back} import addsr_pl.config"
