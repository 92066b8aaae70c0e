"""Opening an exported student folder that may come from anyone: validate, then load.

The manifest (`core.student_format`) is checked whole before any weight is read: its JSON shape, the
type of every field, the sampler's timesteps, each component's class (by name, from `CLASSES`) and
tagger kind (`models.conditioning.TAGGER_TARGETS`), and every file it names, found and, for
safetensors, with a header that fits the file. Weights are read from safetensors only; a pickle
(`.bin`, `.pth` of a component) is refused, since unpickling can run code. Tagger checkpoints (RAM,
DAPE, OpenCLIP) are read with `torch.load(weights_only=True)`. Every problem is a
`StudentFolderError`: one line naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path

from addsr_pl.config import (
    POSITIVE,
    PROBABILITY,
    SPEED,
    TIMESTEP,
    Bool,
    Float,
    Group,
    Int,
    ListOf,
    OneOf,
    Optional,
    Str,
)
from addsr_pl.config import SCHEMA as CONFIG_SCHEMA
from addsr_pl.core.student_format import (
    BACKBONE_COMPONENTS,
    COMPONENT_CLASSES,
    DEFAULT_BACKBONE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    StudentFolderError,
)

WEIGHTS_ENV = "ADDSR_PL_WEIGHTS"
# What to do about a weight reference that is not found, in the terms of each entry point.
FIX = (
    f"set {WEIGHTS_ENV} to the folder that holds it (upscale: --weights-dir; evaluate: paths.weights_dir=...)"
)

SAMPLER = Group({
    # DDPM integers or rectified-flow sigmas; order: checked below, range: by the schedule
    "student_timesteps": OneOf(ListOf(TIMESTEP), ListOf(Float(0, 1))),
    "conditioning_scale": Float(0),
    "psr": Bool(),
    "psr_weight": PROBABILITY,
})  # fmt: skip
TOP_LEVEL = Group({
    "format": Str(),
    "version": Int(1),
    "backbone": Str(),
    "components": Group({name: Group({"class": Str(), "path": Str(), "weights": Str(), "subfolder": Str()})
                         for name in COMPONENT_CLASSES}),
    "conditioning": CONFIG_SCHEMA["conditioning"],
    "sampler": SAMPLER,
    "scale": POSITIVE,
    "speed": Optional(Group(SPEED(optional=True))),
})  # fmt: skip
REQUIRED = {
    "": ("format", "components", "conditioning", "sampler", "scale"),
    "sampler": ("student_timesteps", "conditioning_scale", "psr", "psr_weight"),
    "conditioning": ("prompt", "positive_prompt", "negative_prompt"),
}
# Weight files a component folder holds (diffusers, transformers), and pickle files that are refused.
SAFETENSORS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.ckpt", "model.ckpt")
# The part of a safetensors file that is its JSON header is at most this big (the format's own limit).
MAX_SAFETENSORS_HEADER = 100_000_000


def component_classes() -> dict[str, type]:
    """The classes a manifest may name, by name: the only ones a student folder can make."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        ControlNetModel,
        DDIMScheduler,
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxTransformer2DModel,
        SD3ControlNetModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from addsr_pl.models.seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel
    from addsr_pl.models.vae import PixelUnshuffleCodec

    classes = [UNet2DConditionModel, SeeSRUNet2DConditionModel, ControlNetModel, SeeSRControlNetModel,
               SD3Transformer2DModel, SD3ControlNetModel, FluxTransformer2DModel, FluxControlNetModel, AutoencoderKL, PixelUnshuffleCodec, AutoencoderTiny,
               CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, CLIPTokenizer, T5TokenizerFast,
               DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler]  # fmt: skip
    return {cls.__name__: cls for cls in classes}


def first_line(error: Exception) -> str:
    """`Type: first line of the message`, for a one-line report of an error raised by a library."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _fail(where: Path, problem: str) -> StudentFolderError:
    return StudentFolderError(f"{where}: {problem}")


def read_manifest(folder: str | Path) -> tuple[Path, dict]:
    """(manifest file, manifest) of a student folder, every field checked; no class is imported."""
    folder = Path(folder).expanduser()
    file = folder / MANIFEST
    if not folder.is_dir():
        raise _fail(folder, "no such folder; give an exported student folder (<run dir>/student)")
    if not file.is_file():
        raise _fail(
            file, "missing; give an exported student folder (written by training with export_student=true)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(file, f"not JSON ({error}); re-export the student or restore the file") from None
    if not isinstance(manifest, dict):
        raise _fail(file, f"must be a JSON object, found a {type(manifest).__name__}; re-export the student")
    if manifest.get("format") != FORMAT:
        raise _fail(
            file, f"format {manifest.get('format')!r} is not {FORMAT!r}: not an addsr-pl student folder"
        )
    version = manifest.get("version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise _fail(
            file, f"version {version} is newer than this addsr-pl reads ({FORMAT_VERSION}); upgrade addsr-pl"
        )
    problems = TOP_LEVEL.check(manifest, "manifest")
    if problems:
        raise _fail(file, problems.replace("\n", "; ").replace("manifest.", "") + "; re-export the student")
    for section, keys in REQUIRED.items():
        node = manifest[section] if section else manifest
        missing = [key for key in keys if key not in node]
        if missing:
            where = f"{section}." if section else ""
            raise _fail(file, f"missing {', '.join(where + k for k in missing)}; re-export the student")
    timesteps = manifest["sampler"]["student_timesteps"]
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise _fail(
            file, f"sampler.student_timesteps = {timesteps}: must be a non-empty, strictly decreasing list"
        )
    backbone = manifest.get("backbone", DEFAULT_BACKBONE)
    if backbone not in BACKBONE_COMPONENTS:
        raise _fail(file, f"backbone = {backbone!r}: must be one of {list(BACKBONE_COMPONENTS)}")
    components = manifest["components"]
    missing = [name for name in BACKBONE_COMPONENTS[backbone] if name not in components]
    if missing:
        raise _fail(file, f"components lacks {', '.join(missing)}; re-export the student")
    for name, spec in components.items():
        _check_component(file, name, spec)
    return file, manifest


def _check_component(file: Path, name: str, spec: dict) -> None:
    allowed = COMPONENT_CLASSES[name]
    # Version 1 wrote import paths (`diffusers.models....UNet2DConditionModel`): only the last part is
    # read, as a name; nothing is imported from it.
    package, _, short = spec.get("class", "").rpartition(".")
    if short not in allowed or (
        package and package.split(".")[0] not in ("diffusers", "transformers", "addsr_pl")
    ):
        raise _fail(file, f"components.{name}.class = {spec.get('class')!r}: must be one of {list(allowed)}")
    if ("path" in spec) == ("weights" in spec):
        raise _fail(
            file, f"components.{name}: give exactly one of path (in the folder) or weights (a reference)"
        )
    subfolder = spec.get("subfolder", "")
    if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
        raise _fail(file, f"components.{name}.subfolder = {subfolder!r}: must be a folder name")


def weights_roots(folder: Path, weights_dir: str | Path | None) -> list[Path]:
    """Where a `{"weights": ...}` reference is looked for, in order: the student folder itself, the
    given weights folder (`--weights-dir` / `paths.weights_dir`), `$ADDSR_PL_WEIGHTS`, `./weights`."""
    roots = [folder, weights_dir, os.environ.get(WEIGHTS_ENV), "weights"]
    return list(dict.fromkeys(Path(r).expanduser() for r in roots if r))


def resolve(file: Path, key: str, value, weights_dir: str | Path | None) -> Path:
    """The file or folder that a manifest value names (a path in the folder, an older manifest's absolute
    path, or `{"weights": <relative path>}`); StudentFolderError when it is not there."""
    folder = file.parent
    if isinstance(value, dict):
        relative = Path(value["weights"])
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise _fail(file, f"{key} = {value}: a weights reference is a relative path without '..'")
        roots = weights_roots(folder, weights_dir)
        for root in roots:
            if (root / relative).exists():
                return root / relative
        searched = ", ".join(str(r) for r in roots)
        raise _fail(
            file, f"{key} names {relative.as_posix()} of the weights folder, not found in {searched}: {FIX}"
        )
    path = Path(value)
    if path.is_absolute():  # written by version 1 on the training machine: used where it still exists
        if path.exists():
            return path
        raise _fail(
            file,
            f"{key} = {value!r} does not exist on this machine; re-export the student with this addsr-pl "
            "(it writes weights-relative references) or place the files there",
        )
    if ".." in path.parts:
        raise _fail(file, f"{key} = {value!r}: a path in the student folder cannot leave it ('..')")
    if not (folder / path).exists():
        raise _fail(
            folder / path, f"missing ({key} in {MANIFEST}); re-export the student or restore the files"
        )
    return folder / path


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors lie inside the file (not truncated)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _fail(
                path, f"truncated safetensors file ({size} bytes); re-export the student or restore it"
            )
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise _fail(
                path, "not a safetensors file (its header length does not fit); re-export the student"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _fail(path, "corrupt safetensors header (not JSON); re-export the student") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header; re-export the student")
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
    ]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise _fail(path, f"truncated safetensors file ({size} of {needed} bytes); re-export the student")


def check_weights(location: Path, name: str, cls: type) -> None:
    """The component folder holds its config and, for a model with weights, a sound safetensors file."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if not location.is_dir():
        raise _fail(
            location, f"missing (student component {name}); re-export the student or restore the folder"
        )
    if not issubclass(cls, (ModelMixin, PreTrainedModel)):
        return  # tokenizer and scheduler: text and JSON only
    if not (location / "config.json").is_file():
        raise _fail(location / "config.json", f"missing (student component {name}); re-export the student")
    if getattr(cls, "lossless", False):
        return  # the pixel-unshuffle codec has no weights
    found = [location / f for f in SAFETENSORS if (location / f).is_file()]
    shards = sorted(location.glob("*.safetensors.index.json"))
    if shards:
        try:
            found += [location / s for s in set(json.loads(shards[0].read_text())["weight_map"].values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise _fail(shards[0], "corrupt safetensors index; re-export the student or restore it") from None
    if not found:
        pickles = [location / f for f in PICKLES if (location / f).is_file()]
        if pickles:
            raise _fail(
                pickles[0],
                "pickle weights are refused (unpickling can run code): give safetensors "
                "(save_pretrained(..., safe_serialization=True))",
            )
        raise _fail(location, f"no safetensors weights for component {name} ({' or '.join(SAFETENSORS)})")
    for file in found:
        if not file.is_file():
            raise _fail(file, f"missing (student component {name}); re-export the student or restore it")
        check_safetensors(file)


def locate_components(file: Path, manifest: dict, weights_dir: str | Path | None) -> dict[str, tuple]:
    """name -> (class, root folder, subfolder or None) for every component, its files checked."""
    classes = component_classes()
    located = {}
    for name, spec in manifest["components"].items():
        cls = classes[spec["class"].rpartition(".")[2]]
        key = f"components.{name}.{'weights' if 'weights' in spec else 'path'}"
        value = {"weights": spec["weights"]} if "weights" in spec else spec["path"]
        root = resolve(file, key, value, weights_dir)
        subfolder = spec.get("subfolder") or None
        check_weights(root / subfolder if subfolder else root, name, cls)
        located[name] = (cls, root, subfolder)
    return located


@contextmanager
def quiet_loading():
    """No loading progress bars from transformers / diffusers: stderr keeps one line per problem."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = [m.is_progress_bar_enabled() for m in (transformers_logging, diffusers_logging)]
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, on in zip((transformers_logging, diffusers_logging), shown):
            if on:
                module.enable_progress_bar()


def load_component(name: str, cls: type, root: Path, subfolder: str | None):
    """One component from its checked folder: safetensors only, local files only."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    options: dict = {"local_files_only": True}
    if subfolder:
        options["subfolder"] = subfolder
    if issubclass(cls, (ModelMixin, PreTrainedModel)) and not getattr(cls, "lossless", False):
        options["use_safetensors"] = True
    location = root / subfolder if subfolder else root
    try:
        with quiet_loading():
            return cls.from_pretrained(root, **options)
    except Exception as error:  # any failure of a file from outside is this folder's problem, in one line
        raise _fail(location, f"cannot load student component {name} ({first_line(error)})") from None


def tagger_resolver(file: Path, weights_dir: str | Path | None):
    """`resolve` for `Conditioner.from_config`: a tagger's file arguments, found as `resolve` finds them."""

    def find(value, argument: str) -> Path:
        return resolve(file, f"conditioning.tagger.{argument}", value, weights_dir)

    return find


def check_tagger(file: Path, conditioning: dict, weights_dir: str | Path | None) -> None:
    """The tagger's kind, argument types and files, before any weight is loaded."""
    from addsr_pl.models.conditioning import tagger_files, tagger_kind

    spec = conditioning.get("tagger")
    if not spec:
        return
    try:
        kind = tagger_kind(spec)
    except ValueError as error:
        raise _fail(file, str(error)) from None
    for argument, value in tagger_files(kind, spec):
        resolve(file, f"conditioning.tagger.{argument}", value, weights_dir)
