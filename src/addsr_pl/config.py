"""Start-up checks of a composed config: a bad value fails in the first second, naming key, value and what is allowed."""

from __future__ import annotations

import abc
import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from addsr_pl.core.sampler import LR_RESIZES, NOISE_DRAWS, START_LATENTS
from addsr_pl.core.student_format import MANIFEST
from addsr_pl.inference.speed import COMPILE_MODES, COMPILE_SCOPES, PRECISION_CHOICES
from addsr_pl.method.losses import TA_FORMS, TA_INDEXING, TA_SCHEDULES
from addsr_pl.method.psr_decoder import LOSSES
from addsr_pl.method.speed import COMPILE_BACKENDS
from addsr_pl.models.conditioning import (
    PROMPT_JOINS,
    PROMPT_SOURCES,
    TAGGER_INPUTS,
    TAGGER_TARGETS,
    tagger_kind,
)
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
    _choice(method, "method", "ta_form", TA_FORMS)
    if method["ta_form"] == "continuous" and method["ta_indexing"] != "graded":
        _fail(
            "method.ta_form",
            "continuous",
            "gamma(t) reads the graded step's timestep: set method.ta_indexing=graded, or ta_form=step",
        )
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
    validate_types(cfg)
    if cfg.stage == "teacher":
        validate_teacher(cfg)
        return
    if cfg.stage == "psr_decoder":
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


def validate_teacher(cfg: DictConfig, num_train_timesteps: int = 1000) -> None:
    """Start-up checks of a teacher-stage config, naming key, value and what is allowed."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    required = (
        "unet_trainable_modules",
        "train_whole_unet",
        "timestep_range",
        "null_text_ratio",
        "control_hr_blend",
        "optimizer",
        "val_timesteps",
    )
    missing = [k for k in required if k not in method]
    if missing:
        raise ConfigError(
            f"stage=teacher needs the teacher's method settings (missing method.{missing[0]}): "
            "select them with `method=teacher` or use `stage=teacher`, which does."
        )
    low, high = method["timestep_range"]
    if not 0 <= low < high <= num_train_timesteps:
        raise ConfigError(
            f"method.timestep_range = {[low, high]}: needs 0 <= low < high <= {num_train_timesteps}"
        )
    if not all(0 <= t < num_train_timesteps for t in method["val_timesteps"]):
        raise ConfigError(
            f"method.val_timesteps = {method['val_timesteps']!r}: every timestep must lie in [0, {num_train_timesteps})"
        )
    if not 0.0 <= float(method["null_text_ratio"]) <= 1.0:
        raise ConfigError(f"method.null_text_ratio = {method['null_text_ratio']!r}: must lie in [0, 1]")
    if method["ema_decay"] is not None and not 0.0 < float(method["ema_decay"]) < 1.0:
        raise ConfigError(
            f"method.ema_decay = {method['ema_decay']!r}: must lie in (0, 1), or null for no EMA"
        )
    if int(method["accumulate_grad_batches"]) < 1:
        raise ConfigError(
            f"method.accumulate_grad_batches = {method['accumulate_grad_batches']!r}: must be at least 1"
        )
    conditioning = OmegaConf.to_container(cfg.conditioning, resolve=True)
    _choice(conditioning, "conditioning", "prompt", PROMPT_SOURCES)
    validate_weights(
        (OmegaConf.to_container(cfg.model, resolve=True), "model"), (conditioning, "conditioning")
    )


def validate_psr_decoder(cfg: DictConfig) -> None:
    """Start-up checks of a psr_decoder-stage config, naming key, value and what is allowed."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if "architecture" not in method:
        raise ConfigError(
            "stage=psr_decoder needs its method settings (missing method.architecture): select them with "
            "`method=psr_decoder` or use `stage=psr_decoder`, which does."
        )
    if method["loss"] not in LOSSES:
        raise ConfigError(f"method.loss = {method['loss']!r}: must be one of {list(LOSSES)}")
    for key in ("channels", "blocks_per_stage"):
        if int(method["architecture"][key]) < 1:
            raise ConfigError(f"method.architecture.{key} = {method['architecture'][key]}: must be >= 1")
    student = cfg.get("student_dir")
    if student and not (Path(student).expanduser() / MANIFEST).is_file():
        raise ConfigError(f"student_dir = {student!r}: no {MANIFEST} there; point it at an exported student")
    validate_weights((OmegaConf.to_container(cfg.model, resolve=True), "model"))


# ---------------------------------------------------------------------------------------- typed schema
# Every key of the checked groups has a type here; adding a key is one line in SCHEMA below. A value of
# the wrong type, outside its range or not among its choices fails at start-up naming key, value and
# what is allowed; a key the schema does not know fails with the closest known key.


class Spec(abc.ABC):
    """A value's type: `check` returns None when `value` fits, else what is allowed."""

    @abc.abstractmethod
    def check(self, value, key: str) -> str | None: ...


class Any_(Spec):
    """Anything (constructor arguments handed to a library as they are)."""

    def check(self, value, key):
        return None


ANY = Any_()


class Bool(Spec):
    def check(self, value, key):
        if isinstance(value, bool):
            return None
        close = difflib.get_close_matches(str(value).lower(), ["true", "false"], n=1)
        return "must be true or false" + (f" (did you mean {close[0]}?)" if close else "")


class Str(Spec):
    def check(self, value, key):
        return None if isinstance(value, str) else "must be a string"


class Number(Spec):
    """An int (`integer=True`) or a float, optionally within [low, high] (`open_low`: low excluded)."""

    def __init__(self, low=None, high=None, integer: bool = False, open_low: bool = False):
        self.low, self.high, self.integer, self.open_low = low, high, integer, open_low

    def check(self, value, key):
        kinds = (int,) if self.integer else (int, float)
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"must be {kind}" + self._range()
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            return (
                "must" + (" lie" if self.low is not None and self.high is not None else " be") + self._range()
            )
        return None

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f" {'>' if self.open_low else '>='} {self.low}"
        if self.low is None:
            return f" <= {self.high}"
        return f" in {'(' if self.open_low else '['}{self.low}, {self.high}]"


def Int(low=None, high=None) -> Number:  # noqa: N802 (reads as a type in SCHEMA)
    return Number(low, high, integer=True)


def Float(low=None, high=None, open_low: bool = False) -> Number:  # noqa: N802
    return Number(low, high, open_low=open_low)


class Choice(Spec):
    def __init__(self, *allowed):
        self.allowed = allowed

    def check(self, value, key):
        if value in self.allowed and not isinstance(value, bool):
            return None
        close = difflib.get_close_matches(str(value), [str(a) for a in self.allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"must be one of {list(self.allowed)}{hint}"


class Optional(Spec):
    """null or `inner`."""

    def __init__(self, inner: Spec):
        self.inner = inner

    def check(self, value, key):
        if value is None:
            return None
        problem = self.inner.check(value, key)
        return None if problem is None else f"{problem}, or null"


class ListOf(Spec):
    def __init__(self, item: Spec, length: int | None = None):
        self.item, self.length = item, length

    def check(self, value, key):
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        if self.length is not None and len(value) != self.length:
            return f"must be a list of {self.length} entries"
        for i, entry in enumerate(value):
            problem = self.item.check(entry, f"{key}[{i}]")
            if problem is not None:
                return f"entry {i} ({entry!r}) {problem}"
        return None


class OneOf(Spec):
    """The first of `options` that fits."""

    def __init__(self, *options: Spec):
        self.options = options

    def check(self, value, key):
        problems = [option.check(value, key) for option in self.options]
        return None if any(p is None for p in problems) else " or ".join(dict.fromkeys(problems))


class Group(Spec):
    """A mapping with known keys. `closed`: an unknown key is an error (with the closest known key);
    open groups (a `_target_`'s arguments, which a user's own class may extend) check only the keys they
    know. Values that are still MISSING (`???`) are left to the code that needs them."""

    def __init__(self, fields: dict[str, Spec], closed: bool = True):
        self.fields, self.closed = fields, closed

    def check(self, value, key):
        if not isinstance(value, dict):
            return "must be a mapping"
        problems = []
        for name, entry in value.items():
            full = f"{key}.{name}"
            spec = self.fields.get(name)
            if spec is None:
                if self.closed:
                    close = difflib.get_close_matches(str(name), list(self.fields), n=1)
                    hint = f"; did you mean {key}.{close[0]}?" if close else ""
                    known = ", ".join(self.fields)
                    problems.append(f"{full}: unknown key{hint} (known: {known})")
                continue
            if entry == "???":
                continue
            problem = spec.check(entry, full)
            if problem is not None:
                problems.append(problem if isinstance(spec, Group) else f"{full} = {entry!r}: {problem}")
        return "\n".join(problems) or None


def Target(**fields: Spec) -> Group:  # noqa: N802
    """A node built by `hydra.utils.instantiate`: `_target_` plus (open) constructor arguments."""
    return Group({"_target_": Str(), **fields}, closed=False)


PROBABILITY = Float(0, 1)
TIMESTEP = Int(0, 999)
PATH = Optional(Str())
POSITIVE = Int(1)
NONNEGATIVE = Int(0)
OPTIMIZER = Target(lr=Float(0, open_low=True), weight_decay=Float(0), eps=Float(0, open_low=True),
                   betas=ListOf(Float(0, 1), length=2))  # fmt: skip
LR_SCHEDULER = Target()
DATASET = Optional(Target(names=ListOf(Str()), crop_size=POSITIVE, flip=Bool(), repeats=POSITIVE, seed=Int(),
                          scale=POSITIVE, root=Str(), recursive=Bool(), file_list=PATH, first_n=Optional(POSITIVE),
                          lr_subdir=Str(), hr_subdir=Str(), parts=ANY, pages=POSITIVE, page_size=POSITIVE,
                          seeds=ListOf(NONNEGATIVE), font_sizes=ListOf(POSITIVE, length=2),
                          check_sizes=Bool()))  # fmt: skip


class PlainData(Spec):
    """JSON-like data (mappings, lists, strings, numbers, booleans, null) handed to a library's
    constructor; keys starting with one of `refused` are not allowed (they would make the library fetch
    or build something outside the given files)."""

    def __init__(self, refused: tuple[str, ...] = ()):
        self.refused = refused

    def check(self, value, key):
        if isinstance(value, dict):
            for name, entry in value.items():
                if not isinstance(name, str) or name.startswith(self.refused):
                    return f"key {name!r} is not allowed here (no {'/'.join(self.refused)} keys)"
                problem = self.check(entry, f"{key}.{name}")
                if problem is not None:
                    return problem
            return None
        if isinstance(value, list):
            return next((p for p in (self.check(v, key) for v in value) if p is not None), None)
        if value is None or isinstance(value, (str, int, float, bool)):
            return None
        return f"must be plain data, not {type(value).__name__}"


class Path_(Spec):  # noqa: N801 (reads as a type in SCHEMA)
    """A file or folder: a path string, or in a student manifest `{"weights": "<path under the weights
    folder>"}` (see `core.student_format`)."""

    def check(self, value, key):
        if isinstance(value, str):
            return None
        if isinstance(value, dict) and set(value) == {"weights"} and isinstance(value["weights"], str):
            return None
        return 'must be a path string or {"weights": "<path under the weights folder>"}'


class TaggerSpec(Group):
    """A tagger, or null: one of the known kinds (`kind`, or the `_target_` of its factory in a Hydra
    config) with that kind's typed arguments, every required one present. Nothing else can be built.
    A Group, so that its problems are reported under their own keys (never the whole value)."""

    def __init__(self, kinds: dict[str, tuple[Group, tuple[str, ...]]]):
        super().__init__({})
        self.kinds = kinds

    def check(self, value, key):
        if value is None:
            return None
        if not isinstance(value, dict):
            return f"{key}: must be a mapping (a tagger) or null"
        try:
            kind = tagger_kind(value)
        except ValueError as error:
            return f"{key}: {str(error).removeprefix('conditioning.tagger ')}"
        fields, required = self.kinds[kind]
        arguments = {k: v for k, v in value.items() if k not in ("kind", "_target_")}
        missing = [name for name in required if name not in arguments]
        if missing:
            return f"{key}: the {kind} tagger ({TAGGER_TARGETS[kind]}) needs {', '.join(missing)}"
        return fields.check(arguments, key)


def tagger_spec() -> TaggerSpec:
    preprocess = {
        "interpolation": Choice("bicubic", "bilinear", "nearest", "area"),
        "antialias": Bool(),
        "image_mean": ListOf(Float(), length=3),
        "image_std": ListOf(Float(0, open_low=True), length=3),
        "tag_separator": Str(),
        "dtype": Choice("float32", "bfloat16", "float16"),
    }
    ram_architecture = Group({
        **{name: POSITIVE for name in ("image_size", "patch_size", "embed_dim", "window_size", "representation_dim",
                                        "num_classes", "head_layers", "head_hidden_size", "head_heads",
                                        "head_intermediate_size")},
        "depths": ListOf(POSITIVE), "num_heads": ListOf(POSITIVE), "mlp_ratio": Float(0, open_low=True),
        "swin_norm_eps": Float(0, open_low=True), "head_norm_eps": Float(0, open_low=True),
    })  # fmt: skip
    ram = Group({"folder": Path_(), "architecture": ram_architecture, "checkpoint": Str(), "tag_list": Str(),
                 "tag_thresholds": Str(), "dape": Optional(Path_()), "lora_alpha": Float(0, open_low=True),
                 **preprocess})  # fmt: skip
    ram_random = Group({"architecture": ram_architecture, "tag_list": ListOf(Str()),
                        "class_thresholds": ListOf(Float(0, 1)), "weights": Optional(Path_()),
                        **preprocess})  # fmt: skip
    # open_clip.CLIP's arguments; hf_/timm_ towers would download a model instead of reading the given file
    openclip_config = Group({"embed_dim": POSITIVE, "vision_cfg": PlainData(("hf_", "timm_")),
                             "text_cfg": PlainData(("hf_", "timm_")), "quick_gelu": Bool()})  # fmt: skip
    openclip = Group({"model_name": Str(), "weights": Path_(), "vocabulary": OneOf(Path_(), ListOf(Str())),
                      "model_config": Optional(openclip_config), "representation_dim": POSITIVE,
                      "threshold": Float(0, 1), "top_k": POSITIVE, "projection_seed": Int(), **preprocess})  # fmt: skip
    required_preprocess = ("interpolation", "antialias", "image_mean", "image_std", "tag_separator")
    return TaggerSpec({
        "ram": (ram, ("folder", "architecture", "checkpoint", "tag_list", "tag_thresholds", "dape", "lora_alpha",
                      *required_preprocess)),
        "ram_random": (ram_random, ("architecture", "tag_list", "class_thresholds", *required_preprocess)),
        "openclip": (openclip, ("model_name", "weights", "vocabulary", "representation_dim", "threshold", "top_k",
                                "projection_seed", *required_preprocess)),
    })  # fmt: skip


TAGGER = tagger_spec()
TILING = Group({
    "vae_tile_size": POSITIVE,
    "vae_overlap": NONNEGATIVE,
    "vae_padding": NONNEGATIVE,
    "vae_statistics": Choice("estimate", "exact"),
    "vae_stats_size": Optional(POSITIVE),
    "latent_tile_size": POSITIVE,
    "latent_overlap": NONNEGATIVE,
    "latent_tile_batch_size": POSITIVE,
    "latent_weight_sigma": Float(0, open_low=True),
})  # fmt: skip


def SPEED(optional: bool) -> dict[str, Spec]:  # noqa: N802
    """The speed settings (inference/speed.py): the student's defaults, or upscale's overrides (null: the
    student's)."""
    wrap = Optional if optional else (lambda spec: spec)
    return {
        "precision": wrap(Choice(*PRECISION_CHOICES)),
        "channels_last": wrap(Bool()),
        "tf32": wrap(Bool()),
        "compile": wrap(Choice(*COMPILE_MODES)),
        "compile_scope": wrap(Choice(*COMPILE_SCOPES)),
        "cuda_graph": wrap(Bool()),
        "cuda_graph_warmup": wrap(POSITIVE),
        "cuda_graph_cache": wrap(POSITIVE),
    }


SCHEMA: dict[str, Group] = {
    # stage=addsr's method (conf/method/addsr.yaml)
    "method": Group(
        {
            "student_timesteps": ListOf(Int()),  # order and range: validate_method
            "unroll_probs": ListOf(Float(0)),
            "unroll_start": Choice("random", "first"),
            "student_start": Choice("hr", "lr"),
            "unroll_renoise": Choice("hr", "prediction"),
            "shared_noise": Bool(),
            "psr": Bool(),
            "psr_weight": PROBABILITY,
            "inference_psr_weight": PROBABILITY,
            "inference_speed": Group(SPEED(optional=False)),
            "teacher_condition": Choice("hr", "lr"),
            "teacher_control_image": Choice(None, "hr", "lr"),
            "teacher_prompt_source": Choice(None, "hr", "lr"),
            "teacher_timesteps_per_sample": POSITIVE,
            "teacher_timestep_range": ListOf(Int(0, 1000), length=2),
            "conditioning_scale": Float(0),
            "student_prompt_source": Choice("hr", "lr"),
            "null_text_ratio": PROBABILITY,
            "distill_space": Choice("pixel", "latent"),
            "ta_schedule": OneOf(Choice(*TA_SCHEDULES), ListOf(Float(0))),
            "ta": Group(
                {
                    "exponential": Group({"base": Float(), "ratio": Float()}),
                    "linear": Group({"slope": Float(), "intercept": Float()}),
                }
            ),  # fmt: skip
            "ta_indexing": Choice(*TA_INDEXING),
            "ta_form": Choice(*TA_FORMS),
            "lambda_adv": Float(0),
            "trainable": Choice(*TRAINABLE_SETS),
            "lora": Group(
                {"rank": POSITIVE, "alpha": Float(0, open_low=True), "target_modules": ListOf(Str())}
            ),
            "ema_decay": Float(0, 1),
            "ema_every": Choice("iteration", "micro_step"),
            "accumulate_grad_batches": POSITIVE,
            "loss_divisor": Float(0, open_low=True),
            "gd_order": Choice("generator_first", "discriminator_first"),
            "grad_clip_g": Optional(Float(0, open_low=True)),
            "grad_clip_d": Optional(Float(0, open_low=True)),
            "max_consecutive_nonfinite": POSITIVE,
            "optimizer_g": OPTIMIZER,
            "optimizer_d": OPTIMIZER,
            "lr_scheduler": LR_SCHEDULER,
            "memory": Group(
                {
                    "plan": Choice("auto", "manual"),
                    "memory_cap": Optional(Float(0, open_low=True)),
                    "micro_batch": OneOf(Choice("auto"), POSITIVE),
                    "manual": Group(
                        {
                            "gradient_checkpointing": Bool(),
                            "vae_gradient_checkpointing": Bool(),
                            "teacher_decode_chunk": Optional(POSITIVE),
                        }
                    ),
                    "probe": Group({"warmup": NONNEGATIVE, "iterations": POSITIVE, "margin_gib": Float(0)}),
                    "share_frozen_weights": Bool(),
                    "gradient_checkpointing": OneOf(Choice("auto"), Bool()),
                    "vae_gradient_checkpointing": OneOf(Choice("auto"), Bool()),
                    "vae_outside_autocast": Bool(),
                    "teacher_decode_chunk": OneOf(Choice("auto"), Optional(POSITIVE)),
                    "ema_placement": Choice("device", "cpu"),
                    "ema_dtype": Choice("float32", "bfloat16"),
                    "fused_adamw": Bool(),
                    "discriminator_batched": Bool(),
                }
            ),
            "speed": Group(
                {
                    "channels_last": OneOf(Choice("auto"), Bool()),
                    "tf32": OneOf(Choice("auto"), Bool()),
                    "compile": Choice("auto", *COMPILE_MODES),
                    "compile_backend": Choice(*COMPILE_BACKENDS),
                    "compile_cache": Optional(Str()),
                    "cuda_graph": OneOf(Choice("auto"), Bool()),
                    "cuda_graph_warmup": POSITIVE,
                    "cuda_graph_cache": POSITIVE,
                    "tagger_in_compute_dtype": OneOf(Choice("auto"), Bool()),
                }
            ),
            "val_steps": ListOf(POSITIVE),
        }
    ),  # fmt: skip
    # stage=teacher's method (conf/method/teacher.yaml)
    "method@teacher": Group(
        {
            "unet_trainable_modules": ListOf(Str()),
            "train_whole_unet": Bool(),
            "timestep_range": ListOf(Int(0, 1000), length=2),
            "null_text_ratio": PROBABILITY,
            "control_hr_blend": PROBABILITY,
            "conditioning_scale": Float(0),
            "accumulate_grad_batches": POSITIVE,
            "grad_clip": Optional(Float(0, open_low=True)),
            "ema_decay": Optional(Float(0, 1)),
            "optimizer": OPTIMIZER,
            "lr_scheduler": LR_SCHEDULER,
            "val_timesteps": ListOf(TIMESTEP),
        }
    ),  # fmt: skip
    # stage=psr_decoder's method (conf/method/psr_decoder.yaml)
    "method@psr_decoder": Group(
        {
            "architecture": Group({"channels": POSITIVE, "blocks_per_stage": POSITIVE}),
            "loss": Choice("l1", "mse"),
            "include_lr": Bool(),
            "latent_jitter": Float(0),
            "optimizer": OPTIMIZER,
            "lr_scheduler": LR_SCHEDULER,
        }
    ),  # fmt: skip
    "data": Target(
        scale=POSITIVE,
        crop_size=POSITIVE,
        batch_size=POSITIVE,
        val_batch_size=POSITIVE,
        num_workers=NONNEGATIVE,
        pin_memory=Bool(),
        persistent_workers=Bool(),
        seed=Int(),
        max_bad_fraction=PROBABILITY,
        val_count=NONNEGATIVE,
        train=DATASET,
        val=DATASET,
        test=DATASET,
        # the degradation's own numbers are checked by its module
        degradation=ANY,
    ),  # fmt: skip
    "model": Group(
        {
            "components": Target(
                pretrained_path=Str(),
                seesr_path=Str(),
                hybrid=Bool(),
                unet_path=PATH,
                controlnet_path=PATH,
                vae_path=PATH,
                codec=Choice("vae", "pixel_unshuffle"),
                init_seed=Int(),
                cache_dir=Str(),
                tokenizer_max_length=POSITIVE,
                zero_conv_std=Float(0),
                image_cross_attention_dim=Optional(POSITIVE),
                # SD3 (models/backbones/sd3.py)
                transformer_path=PATH,
                controlnet_layers=POSITIVE,
                # FLUX.1 (models/backbones/flux.py)
                controlnet_single_layers=NONNEGATIVE,
                flow_shift=Float(0, open_low=True),
                # diffusers / transformers constructor arguments, as those libraries take them
                unet=ANY,
                controlnet=ANY,
                vae=ANY,
                text_encoder=ANY,
                scheduler=ANY,
                transformer=ANY,
                clip_text_encoder=ANY,
                t5_text_encoder=ANY,
                reference_scheduler=ANY,
            ),
            "discriminator": Target(
                backbone=ANY,
                backbone_weights=PATH,
                hook_blocks=ListOf(NONNEGATIVE),
                conditioner=ANY,
                conditioner_weights=PATH,
                conditioner_image_size=POSITIVE,
                image_size=POSITIVE,
                crop_prob=PROBABILITY,
                translation=Float(0, 1),
                cutout=Float(0, 1),
                cmap_dim=POSITIVE,
                cmapper_equalized=Bool(),
                head_groups=POSITIVE,
                head_kernel_size=POSITIVE,
                leaky_slope=Float(0),
            ),
        }
    ),  # fmt: skip
    "conditioning": Group(
        {
            "prompt": Choice(*PROMPT_SOURCES),
            "positive_prompt": Str(),
            "negative_prompt": Str(),
            "manual_prompt": Str(),
            "tagger": TAGGER,
            "prompt_join": Choice(*PROMPT_JOINS),
            "train_positive_prompt": Bool(),
            "train_tags": Choice("tagger", "original_ram"),
            "prompt_cache_size": NONNEGATIVE,
            "inference_tagger_input": Choice(*TAGGER_INPUTS),
            "max_sequence_length": POSITIVE,
            "representation_in_context": Bool(),
            "guidance_scale": Optional(Float(0)),
        }
    ),  # fmt: skip
    # conf/upscale.yaml with the command line's flags merged in
    "upscale": Group(
        {
            "prompt_source": Choice("tagger", "text", "none"),
            "prompt": Optional(Str()),
            "steps": OneOf(POSITIVE, ListOf(TIMESTEP)),
            "psr_weight": Optional(PROBABILITY),
            "seed": Int(),
            **SPEED(optional=True),
            "compile_cache": Optional(Str()),
            "compile_estimate_s": NONNEGATIVE,
            "psr_decoder": Choice(None, "vae", "tiny"),
            "batch_size": POSITIVE,
            "prefetch": POSITIVE,
            "write_queue": POSITIVE,
            "device": Str(),
            "weights_dir": Str(),
            "color_fix": Choice("adain", "wavelet", "none"),
            "wavelet_levels": POSITIVE,
            "outscale": Optional(Float(0, open_low=True)),
            "suffix": Str(),
            "format": Choice(None, "png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"),
            "jpeg_quality": Int(1, 100),
            "limits": Group(
                {"min_input_side": POSITIVE, "max_output_pixels": POSITIVE, "max_input_pixels": POSITIVE}
            ),
            "tiling": TILING,
            "resize": Choice(*LR_RESIZES),
            "pil_resize": Group({"min_side": POSITIVE, "multiple": POSITIVE}),
            "start_latent": Choice(*START_LATENTS),
            "noise": Choice(*NOISE_DRAWS),
            "prompt_join": Choice(None, *PROMPT_JOINS),
            "tagger_input": Choice(None, *TAGGER_INPUTS),
            "official": Group(
                {
                    "resize": Choice(*LR_RESIZES),
                    "start_latent": Choice(*START_LATENTS),
                    "noise": Choice(*NOISE_DRAWS),
                    "prompt_join": Choice(None, *PROMPT_JOINS),
                    "tagger_input": Choice(None, *TAGGER_INPUTS),
                    "color_fix": Choice("adain", "wavelet", "none"),
                    "psr_weight": Optional(PROBABILITY),
                    "steps": OneOf(POSITIVE, ListOf(TIMESTEP)),
                    "prompt_source": Choice("tagger", "text", "none"),
                }
            ),
        }
    ),  # fmt: skip
}


def check_schema(values: dict, group: str, prefix: str | None = None) -> None:
    """Check `values` (a plain dict) against `SCHEMA[group]`; raise ConfigError listing every problem."""
    problems = SCHEMA[group].check(values, prefix or group.split("@")[0])
    if problems:
        raise ConfigError(problems)


def validate_types(cfg: DictConfig) -> None:
    """Every boolean, enum and number of the method, data, model and conditioning groups by type."""
    method = {"teacher": "method@teacher", "psr_decoder": "method@psr_decoder"}.get(
        cfg.get("stage"), "method"
    )
    problems = []
    for group, key in (
        (method, "method"),
        ("data", "data"),
        ("model", "model"),
        ("conditioning", "conditioning"),
    ):
        if key in cfg:
            found = SCHEMA[group].check(OmegaConf.to_container(cfg[key], resolve=True), key)
            problems += [found] if found else []
    if problems:
        raise ConfigError("\n".join(problems))
