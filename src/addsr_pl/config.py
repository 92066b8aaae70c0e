"""Start-up checks of a composed config: a bad value fails in the first second, naming key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from addsr_pl.method.losses import TA_INDEXING, TA_SCHEDULES
from addsr_pl.models.conditioning import PROMPT_JOINS, PROMPT_SOURCES
from addsr_pl.models.trainable import TRAINABLE_SETS


class ConfigError(ValueError):
    """A config value is outside what the method allows."""


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key} = {value!r}: {allowed}")


def _choice(section: dict, prefix: str, key: str, allowed: tuple) -> None:
    if section[key] not in allowed:
        _fail(f"{prefix}.{key}", section[key], f"must be one of {list(allowed)}")


def validate_method(method: dict, num_train_timesteps: int = 1000) -> None:
    ts = list(method["student_timesteps"])
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
        _fail("method.student_timesteps", ts, "must be a non-empty, strictly decreasing list")
    if not all(0 <= t < num_train_timesteps for t in ts):
        _fail("method.student_timesteps", ts, f"every timestep must lie in [0, {num_train_timesteps})")
    probs = list(method["unroll_probs"])
    if not probs or len(probs) > len(ts) or any(p < 0 for p in probs) or sum(probs) <= 0:
        _fail(
            "method.unroll_probs",
            probs,
            f"P(k = 1), P(k = 2), ...: non-negative, not all zero, at most {len(ts)} entries (one per student timestep)",
        )
    if not 0.0 <= float(method["psr_weight"]) <= 1.0:
        _fail("method.psr_weight", method["psr_weight"], "must lie in [0, 1] (1 = the prediction alone)")
    if not 0.0 <= float(method["inference_psr_weight"]) <= 1.0:
        _fail("method.inference_psr_weight", method["inference_psr_weight"], "must lie in [0, 1]")
    schedule = method["ta_schedule"]
    if isinstance(schedule, str):
        if schedule not in TA_SCHEDULES:
            _fail(
                "method.ta_schedule",
                schedule,
                f"must be one of {list(TA_SCHEDULES)} or a list of {len(ts)} weights",
            )
    elif len(schedule) != len(ts):
        _fail(
            "method.ta_schedule", list(schedule), f"a list needs one weight per student timestep ({len(ts)})"
        )
    _choice(method, "method", "ta_indexing", TA_INDEXING)
    _choice(method, "method", "teacher_condition", ("hr", "lr"))
    _choice(method, "method", "teacher_control_image", (None, "hr", "lr"))
    _choice(method, "method", "teacher_prompt_source", (None, "hr", "lr"))
    _choice(method, "method", "distill_space", ("pixel", "latent"))
    _choice(method, "method", "unroll_start", ("random", "first"))
    _choice(method, "method", "student_start", ("hr", "lr"))
    _choice(method, "method", "unroll_renoise", ("hr", "prediction"))
    _choice(method, "method", "trainable", TRAINABLE_SETS)
    _choice(method, "method", "student_prompt_source", ("hr", "lr"))
    _choice(method, "method", "gd_order", ("generator_first", "discriminator_first"))
    _choice(method, "method", "ema_every", ("iteration", "micro_step"))
    low, high = method["teacher_timestep_range"]
    if not 0 <= low < high <= num_train_timesteps:
        _fail("method.teacher_timestep_range", [low, high], f"needs 0 <= low < high <= {num_train_timesteps}")
    if int(method["teacher_timesteps_per_sample"]) < 1:
        _fail(
            "method.teacher_timesteps_per_sample",
            method["teacher_timesteps_per_sample"],
            "must be at least 1",
        )
    if int(method["accumulate_grad_batches"]) < 1:
        _fail("method.accumulate_grad_batches", method["accumulate_grad_batches"], "must be at least 1")
    if not 0.0 <= float(method["ema_decay"]) < 1.0:
        _fail("method.ema_decay", method["ema_decay"], "must lie in [0, 1)")
    if not 0.0 <= float(method["null_text_ratio"]) <= 1.0:
        _fail("method.null_text_ratio", method["null_text_ratio"], "must lie in [0, 1]")


# Config keys whose string values name a weight folder or file (besides `*_path` and `*_weights`).
WEIGHT_KEYS = ("folder", "dape", "weights", "vocabulary")


def _weight_paths(node, prefix: str):
    """(key, path) of every config value that names a weight folder or file."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{prefix}.{key}"
            if isinstance(value, str) and (key.endswith(("_path", "_weights")) or key in WEIGHT_KEYS):
                yield name, value
            else:
                yield from _weight_paths(value, name)


def missing_weights(node: dict, prefix: str) -> list[str]:
    """'key = path' for every weight folder or file named under `node` that does not exist."""
    return [
        f"{key} = {path!r}"
        for key, path in _weight_paths(node, prefix)
        if not Path(path).expanduser().exists()
    ]


def validate_weights(*sections: tuple[dict, str]) -> None:
    """Every weight folder or file the config names exists; all missing ones are listed at once."""
    missing = [line for node, prefix in sections for line in missing_weights(node, prefix)]
    if missing:
        raise ConfigError(
            "Weight files or folders not found:\n  "
            + "\n  ".join(f"{line}: no such file or folder" for line in missing)
            + "\nPoint them at your local copies (see the README's 'Weights' section), "
            "e.g. `paths.weights_dir=/data/weights`."
        )


def validate(cfg: DictConfig) -> None:
    """Check the parts of a training config that would otherwise fail minutes (or hours) in."""
    if cfg.stage == "teacher":
        from addsr_pl.method.teacher import validate_teacher  # the teacher stage's own method keys

        validate_teacher(cfg)
        return
    if cfg.stage == "psr_decoder":
        from addsr_pl.method.psr_decoder import validate_psr_decoder  # the stage's own method keys

        validate_psr_decoder(cfg)
        return
    if cfg.stage != "addsr":
        _fail(
            "stage",
            cfg.stage,
            "must be 'addsr' (distil the student), 'teacher' (train its teacher) or 'psr_decoder' "
            "(distil the small PSR decoder)",
        )
    method = OmegaConf.to_container(cfg.method, resolve=True)
    validate_method(method)
    conditioning = OmegaConf.to_container(cfg.conditioning, resolve=True)
    _choice(conditioning, "conditioning", "prompt", PROMPT_SOURCES)
    _choice(conditioning, "conditioning", "prompt_join", PROMPT_JOINS)
    validate_weights(
        (OmegaConf.to_container(cfg.model, resolve=True), "model"), (conditioning, "conditioning")
    )
