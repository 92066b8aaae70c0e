"""`addsr-pl import-official`: the released AddSR model as a student folder that `addsr-pl upscale` reads.

The official release is four downloads (its README): SD-2-base (tokenizer, text encoder, VAE,
scheduler), the AddSR model folder (`unet/`, `controlnet/`: SeeSR's classes with `image_attentions`),
RAM Swin-L 14M with its tag files, and DAPE. The student folder written here holds only
`addsr_student.json`, which refers to those files relative to the weights folder (`{"weights": ...}`,
found again at load time through the student folder, `--weights-dir`, `$ADDSR_PL_WEIGHTS` or
`./weights`), so nothing is copied, except pickle weights: a `unet/` or `controlnet/` that holds
only `diffusion_pytorch_model.bin` is read with `torch.load(weights_only=True)` (plain tensors, no
code) and written into the student folder as safetensors, since `upscale` loads safetensors only.

Every file is checked before the manifest is written: folders, configs (JSON), safetensors headers,
the checkpoint files' container format, the tag files' lengths. Any problem is one line naming the
file, the problem and the fix (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from addsr_pl.core.student_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    StudentFolderError,
    weights_reference,
)
from addsr_pl.inference.student import SAFETENSORS, check_safetensors, check_weights
from addsr_pl.paths import config_dir

# The official components and the classes that read them (names of `core.student_format.COMPONENT_CLASSES`).
SD2_COMPONENTS = {
    "tokenizer": "CLIPTokenizer",
    "text_encoder": "CLIPTextModel",
    "vae": "AutoencoderKL",
    "scheduler": "DDPMScheduler",
}
ADDSR_COMPONENTS = {"unet": "SeeSRUNet2DConditionModel", "controlnet": "SeeSRControlNetModel"}
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
# The first bytes of a torch.save file: a zip archive (torch >= 1.6) or a bare pickle (protocol 2+).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class OfficialImportError(ValueError):
    """A file of the official release that cannot be used: one line naming it, the problem and the fix."""


def defaults() -> dict:
    """conf/import_official.yaml as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "import_official.yaml"), resolve=True)


def _fail(where: Path, problem: str) -> OfficialImportError:
    return OfficialImportError(f"{where}: {problem}")


def _read_json(file: Path, fix: str) -> dict:
    if not file.is_file():
        raise _fail(file, f"missing; {fix}")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(file, f"not JSON ({error.__class__.__name__}); {fix}") from None
    if not isinstance(value, dict):
        raise _fail(file, f"must be a JSON object; {fix}")
    return value


def _check_torch_file(file: Path, what: str, fix: str) -> None:
    """A file written by torch.save (zip or pickle container), by its first bytes; read later with
    weights_only=True only."""
    if not file.is_file():
        raise _fail(file, f"missing ({what}); {fix}")
    with file.open("rb") as handle:
        head = handle.read(4)
    if not any(head.startswith(magic) for magic in TORCH_FILE_MAGIC):
        raise _fail(file, f"not a PyTorch checkpoint ({what}); {fix}")


def locate(weights_dir: Path, value: str, what: str) -> tuple[Path, str]:
    """(path, reference relative to the weights folder) of a file given relative to it or by a path
    inside it; a path outside the weights folder is refused (the manifest holds no absolute path)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = weights_dir / path
    reference = weights_reference(path, weights_dir)
    if reference is None:
        raise OfficialImportError(
            f"{path}: {what} lies outside the weights folder {weights_dir}; move or link it there, or give "
            "--weights-dir the folder that holds all the official files"
        )
    if not path.exists():
        raise _fail(path, f"missing ({what}); download it as docs/compatibility.md says and place it there")
    return path, reference


def check_sd2(folder: Path) -> None:
    """SD-2-base in the diffusers layout, safetensors weights (the Hugging Face repository has them)."""
    from addsr_pl.inference.student import component_classes

    classes = component_classes()
    fix = "download stabilityai/stable-diffusion-2-base (diffusers layout, safetensors) into it"
    for name, cls in SD2_COMPONENTS.items():
        location = folder / name
        if not location.is_dir():
            raise _fail(location, f"missing (SD-2-base {name}); {fix}")
        if name == "tokenizer":
            for file in ("vocab.json", "merges.txt"):
                if not (location / file).is_file():
                    raise _fail(location / file, f"missing (SD-2-base tokenizer); {fix}")
        elif name == "scheduler":
            _read_json(location / "scheduler_config.json", fix)
        else:
            _read_json(location / "config.json", fix)
            try:
                check_weights(location, name, classes[cls])
            except ValueError as error:
                raise OfficialImportError(f"{str(error).split(';')[0]}; {fix}") from None


def convert_pickle(source: Path, target: Path) -> None:
    """A pickle state dict read with weights_only=True (plain tensors only) written as safetensors."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only refuses any object that is not a plain tensor container
        message = (str(error).strip().splitlines() or [""])[0][:200]
        raise _fail(
            source,
            f"cannot be read as plain tensors ({type(error).__name__}: {message}); use the official "
            "release's files (or convert them to safetensors yourself)",
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _fail(source, "is not a state dict (names to tensors); use the official release's files")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={"format": "pt"})


def check_addsr(folder: Path, out: Path) -> dict[str, dict]:
    """The manifest entries of the AddSR UNet and ControlNet: references to the official folder, or
    (pickle weights) safetensors converted into the student folder."""
    components = {}
    for name, cls in ADDSR_COMPONENTS.items():
        location = folder / name
        fix = "download the AddSR model folder of the official README (unet/ and controlnet/)"
        if not location.is_dir():
            raise _fail(location, f"missing (AddSR {name}); {fix}")
        config = _read_json(location / "config.json", fix)
        if not config.get("use_image_cross_attention"):
            raise _fail(
                location / "config.json",
                "has no use_image_cross_attention: true, so it is not an AddSR/SeeSR model with RAM image "
                f"attention; {fix}",
            )
        safetensors = [location / f for f in SAFETENSORS if (location / f).is_file()]
        if safetensors:
            try:
                check_safetensors(safetensors[0])
            except StudentFolderError as error:
                raise OfficialImportError(f"{str(error).split(';')[0]}; {fix}") from None
            components[name] = {"class": cls, "subfolder": name}
            continue
        pickle = location / PICKLE_WEIGHTS
        if not pickle.is_file():
            raise _fail(location, f"no weights ({SAFETENSORS[0]} or {PICKLE_WEIGHTS}); {fix}")
        convert_pickle(pickle, out / name / SAFETENSORS[0])
        shutil.copy2(location / "config.json", out / name / "config.json")
        components[name] = {"class": cls, "path": name}
    return components


def check_ram(folder: Path, tagger: dict) -> None:
    """RAM's checkpoint and its two tag files, one line per tag, as many as the architecture's classes."""
    fix = "place ram_swin_large_14m.pth and recognize-anything's ram/data/ tag files there"
    _check_torch_file(folder / tagger["checkpoint"], "the RAM checkpoint", fix)
    counts = {}
    for key in ("tag_list", "tag_thresholds"):
        file = folder / tagger[key]
        if not file.is_file():
            raise _fail(file, f"missing (RAM's {key.replace('_', ' ')}); {fix}")
        try:
            counts[key] = len(file.read_text(encoding="utf-8").splitlines())
        except UnicodeDecodeError:
            raise _fail(file, f"not UTF-8 text; {fix}") from None
    classes = tagger["architecture"]["num_classes"]
    if counts["tag_list"] != classes or counts["tag_thresholds"] != classes:
        raise _fail(
            folder,
            f"{tagger['tag_list']} has {counts['tag_list']} lines and {tagger['tag_thresholds']} "
            f"{counts['tag_thresholds']}, but RAM has {classes} tags; use the tag files of RAM Swin-L 14M",
        )


def conditioning(architecture: dict | None) -> dict:
    """The official conditioning: DAPE-merged RAM tags + the positive prompt and RAM's representation
    (conf/conditioning/ram.yaml over fixed.yaml), with this project's join and step-1 tagger input."""
    groups = config_dir() / "conditioning"
    ram = OmegaConf.load(groups / "ram.yaml")
    ram.pop("defaults", None)
    ram.tagger.pop("_target_")
    ram.tagger.folder = ram.tagger.dape = None  # the references are set by the caller
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(groups / "fixed.yaml"), ram), resolve=True)
    merged["tagger"] = {"kind": "ram", **merged["tagger"]}
    if architecture is not None:
        merged["tagger"]["architecture"] = architecture
    return merged


def import_official(
    out: str | Path,
    weights_dir: str | Path,
    sd2: str,
    addsr: str,
    ram: str,
    dape: str,
    sampler: dict,
    scale: int,
    ram_architecture: dict | None = None,
) -> Path:
    """Check the official files under `weights_dir` and write the student folder `out` that refers to
    them; returns `out`. OfficialImportError (one line) for anything missing or malformed."""
    from addsr_pl.config import TAGGER

    weights_dir = Path(weights_dir).expanduser()
    if not weights_dir.is_dir():
        raise OfficialImportError(
            f"{weights_dir}: the weights folder does not exist; give --weights-dir the folder holding the "
            "official files (or set ADDSR_PL_WEIGHTS)"
        )
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(p.name != MANIFEST for p in out.iterdir())):
        raise OfficialImportError(f"-o {out}: exists and is not an empty folder; choose a new folder")
    sd2_path, sd2_ref = locate(weights_dir, sd2, "SD-2-base")
    addsr_path, addsr_ref = locate(weights_dir, addsr, "the AddSR model folder")
    ram_path, ram_ref = locate(weights_dir, ram, "the RAM folder")
    dape_path, dape_ref = locate(weights_dir, dape, "the DAPE file")
    check_sd2(sd2_path)
    spec = conditioning(ram_architecture)
    tagger = spec["tagger"]
    tagger["folder"] = {"weights": ram_ref}
    tagger["dape"] = {"weights": dape_ref}
    problem = TAGGER.check(tagger, "conditioning.tagger")
    if problem is not None:
        raise OfficialImportError(f"the RAM architecture: {problem.splitlines()[0]}")
    check_ram(ram_path, tagger)
    _check_torch_file(dape_path, "the DAPE LoRA", "download DAPE.pth as the official README says")
    out.mkdir(parents=True, exist_ok=True)
    components = {
        name: {"class": cls, "weights": sd2_ref, "subfolder": name} for name, cls in SD2_COMPONENTS.items()
    }
    for name, entry in check_addsr(addsr_path, out).items():
        components[name] = entry if "path" in entry else {**entry, "weights": addsr_ref}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "components": components,
        "conditioning": spec,
        "sampler": sampler,
        "scale": scale,
        "speed": None,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def parser() -> argparse.ArgumentParser:
    d = defaults()
    p = argparse.ArgumentParser(
        prog="addsr-pl import-official",
        description="Write a student folder that runs the released AddSR model (its files referred to, not "
        "copied). Paths are relative to the weights folder. See docs/compatibility.md.",
        epilog="Then: addsr-pl upscale INPUT -o OUTPUT --model OUT --weights-dir WEIGHTS [--official]. "
        "Exit codes: 0 written, 2 a file is missing or malformed.",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the student folder to write")
    p.add_argument(
        "--weights-dir", default=d["weights_dir"],
        help=f"the folder holding the official files (default: {d['weights_dir']})",
    )  # fmt: skip
    p.add_argument("--sd2", default=d["sd2"], help=f"SD-2-base folder (default: {d['sd2']})")
    p.add_argument(
        "--addsr", default=d["addsr"], help=f"AddSR model folder, unet/ controlnet/ (default: {d['addsr']})"
    )
    p.add_argument(
        "--ram", default=d["ram"], help=f"folder of RAM's checkpoint and tag files (default: {d['ram']})"
    )
    p.add_argument("--dape", default=d["dape"], help=f"DAPE LoRA file (default: {d['dape']})")
    p.add_argument(
        "--ram-architecture", type=Path,
        help="a YAML file of RAM's sizes (default: RAM Swin-L 14M, conf/conditioning/ram.yaml)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    d = defaults()
    try:
        architecture = None
        if args.ram_architecture is not None:
            if not args.ram_architecture.is_file():
                raise _fail(args.ram_architecture, "missing; give a YAML file of RAM's sizes")
            try:
                architecture = OmegaConf.to_container(OmegaConf.load(args.ram_architecture), resolve=True)
            except Exception as error:  # any YAML problem of a user's file: one line
                raise _fail(args.ram_architecture, f"not a YAML mapping ({type(error).__name__})") from None
        out = import_official(
            args.output, args.weights_dir, args.sd2, args.addsr, args.ram, args.dape,
            d["sampler"], d["scale"], architecture,
        )  # fmt: skip
    except OfficialImportError as error:
        print(f"addsr-pl import-official: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {out / MANIFEST}: addsr-pl upscale INPUT -o OUTPUT --model {out} --weights-dir {args.weights_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
