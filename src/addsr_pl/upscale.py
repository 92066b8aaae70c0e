"""`addsr-pl upscale INPUT -o OUTPUT --model DIR` (also `python -m addsr_pl.upscale`).

Exit codes: 0 every image written (or skipped as existing), 1 some image failed (each one is reported and
the others go on), 2 bad arguments or environment (one line naming the problem and the fix, before any
image is processed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from addsr_pl.config import ConfigError, check_schema
from addsr_pl.core.sampler import LR_RESIZES, NOISE_DRAWS, START_LATENTS
from addsr_pl.core.student_format import MANIFEST
from addsr_pl.inference.io import list_images, plan_outputs
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.speed import COMPILE_MODES, COMPILE_SCOPES, PRECISION_CHOICES
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.models.conditioning import PROMPT_JOINS, TAGGER_INPUTS
from addsr_pl.paths import config_dir


class UsageError(ValueError):
    """A bad argument or environment: reported as one line, exit code 2."""


def defaults() -> dict:
    """conf/upscale.yaml as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "upscale.yaml"), resolve=True)


def parser() -> argparse.ArgumentParser:
    d = defaults()

    def default(value) -> str:
        return f" (default: {'none' if value is None else value})"

    p = argparse.ArgumentParser(
        prog="addsr-pl upscale",
        description="Super-resolve images with an AddSR student. Defaults come from conf/upscale.yaml.",
        epilog="Exit codes: 0 all written, 1 some image failed (the others are still written), 2 bad arguments.",
    )
    p.add_argument("input", type=Path, help="an image file or a folder (searched recursively)")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="output file or folder (mirrors the input tree)"
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="a student folder: exported by training (<run dir>/student) or written by import-official",
    )
    p.add_argument(
        "--steps", type=int, help="student steps, 1..4 (the first N student timesteps)" + default(d["steps"])
    )
    p.add_argument("--timesteps", help="explicit decreasing timesteps, e.g. 999,499 (instead of --steps)")
    p.add_argument(
        "--psr-weight", type=float,
        help="PSR blend of the prediction with the LR, in [0, 1] (default: the student's own)",
    )  # fmt: skip
    p.add_argument(
        "--prompt-source", choices=["tagger", "text", "none"],
        help="where the prompt comes from" + default(d["prompt_source"]),
    )  # fmt: skip
    p.add_argument("--prompt", help="prompt text (implies --prompt-source text)")
    p.add_argument("--seed", type=int, help="noise seed" + default(d["seed"]))
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction,
        help="channels_last weights" + default(d["channels_last"] or "the student's"),
    )  # fmt: skip
    p.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction,
        help="TF32 for fp32 work on CUDA" + default(d["tf32"] or "the student's"),
    )  # fmt: skip
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile mode" + default(d["compile"] or "the student's"),
    )
    p.add_argument(
        "--compile-scope", choices=COMPILE_SCOPES,
        help="modules: each large module once | sampler: the whole sampler" + default(d["compile_scope"] or "the student's"),
    )  # fmt: skip
    p.add_argument(
        "--compile-cache", metavar="DIR",
        help="where compiled graphs are kept between runs (also $ADDSR_PL_COMPILE_CACHE)"
        + default(d["compile_cache"] or "~/.cache/addsr-pl/compile"),
    )  # fmt: skip
    p.add_argument(
        "--cuda-graph", action=argparse.BooleanOptionalAction,
        help="the whole sampler as a CUDA graph per (steps, size, batch), captured once and replayed"
        + default(d["cuda_graph"] or "the student's"),
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int,
        help="same-size images (and latent tiles) per sampler call" + default(d["batch_size"]),
    )  # fmt: skip
    p.add_argument(
        "--psr-decoder", choices=["vae", "tiny"],
        help="decoder of PSR's intermediate steps (tiny: the small one)" + default(d["psr_decoder"] or "the student's"),
    )  # fmt: skip
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        help="auto: bf16 on CUDA, fp32 on the CPU" + default(d["precision"] or "the student's"),
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ..." + default(d["device"]))
    p.add_argument(
        "--weights-dir",
        help="where the student's weight references (SD2, RAM, DAPE files) are found after the student "
        "folder itself" + default(d["weights_dir"]),
    )
    p.add_argument(
        "--outscale", type=float,
        help="output scale, > 0 (the x4 result is resized to it)" + default(d["outscale"] or "the model's, x4"),
    )  # fmt: skip
    p.add_argument(
        "--color-fix",
        choices=["adain", "wavelet", "none"],
        help="colour correction" + default(d["color_fix"]),
    )
    p.add_argument(
        "--format", choices=["png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"],
        help="output format" + default(d["format"] or "the input's"),
    )  # fmt: skip
    p.add_argument("--jpeg-quality", type=int, help="JPEG/WebP quality, 1..100" + default(d["jpeg_quality"]))
    p.add_argument("--suffix", help="appended to output file names, e.g. _x4" + default(repr(d["suffix"])))
    tiling = d["tiling"]
    p.add_argument(
        "--tile-size", type=int,
        help="latent tile side (latent cells) above which diffusion is tiled" + default(tiling["latent_tile_size"]),
    )  # fmt: skip
    p.add_argument(
        "--vae-tile-size", type=int, help="VAE tile side in pixels" + default(tiling["vae_tile_size"])
    )
    p.add_argument(
        "--vae-tile-overlap", type=int,
        help="overlap of VAE tiles in pixels, below --vae-tile-size" + default(tiling["vae_overlap"]),
    )  # fmt: skip
    official = ", ".join(f"{k}={v}" for k, v in d["official"].items())
    p.add_argument(
        "--official", action="store_true",
        help=f"the official test_addsr.py's behaviour: {official} (flags given beside it still win)",
    )  # fmt: skip
    p.add_argument(
        "--resize", choices=LR_RESIZES,
        help="LR upscaling: torch (float bicubic) | pil (official: 8-bit PIL bicubic, short side >= "
        f"{d['pil_resize']['min_side']}, sides floored to {d['pil_resize']['multiple']})" + default(d["resize"]),
    )  # fmt: skip
    p.add_argument(
        "--pil-min-side", type=int,
        help="with --resize pil: a shorter input side is first enlarged to this (official: --process_size / 4)"
        + default(d["pil_resize"]["min_side"]),
    )  # fmt: skip
    p.add_argument(
        "--start-latent", choices=START_LATENTS,
        help="step 1 noises the VAE posterior's mean | a sample of it (official)" + default(d["start_latent"]),
    )  # fmt: skip
    p.add_argument(
        "--noise", choices=NOISE_DRAWS,
        help="noise draws: per image | in the official pipeline's order" + default(d["noise"]),
    )  # fmt: skip
    p.add_argument(
        "--prompt-join", choices=PROMPT_JOINS,
        help="'{tags}, {positive}' | '{tags}, ,{positive}' (official)" + default(d["prompt_join"] or "the student's"),
    )  # fmt: skip
    p.add_argument(
        "--tagger-input", choices=TAGGER_INPUTS,
        help="what the tagger sees at step 1: the upscaled LR | the LR resized bilinearly (official)"
        + default(d["tagger_input"] or "the student's"),
    )  # fmt: skip
    p.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from(args: argparse.Namespace) -> dict:
    """conf/upscale.yaml with the given flags merged in (not yet checked: see `check_settings`)."""
    s = defaults()
    if getattr(args, "official", False):
        s.update(s["official"])
    for key in (
        "resize",
        "start_latent",
        "noise",
        "prompt_join",
        "tagger_input",
        "psr_weight",
        "seed",
        "precision",
        "device",
        "weights_dir",
        "outscale",
        "color_fix",
        "format",
        "suffix",
        "prompt_source",
        "channels_last",
        "tf32",
        "compile",
        "compile_scope",
        "compile_cache",
        "cuda_graph",
        "psr_decoder",
        "jpeg_quality",
    ):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if args.steps is not None:
        s["steps"] = args.steps
    if args.timesteps:
        try:
            s["steps"] = [int(t) for t in args.timesteps.split(",")]
        except ValueError:
            raise UsageError(
                f"--timesteps {args.timesteps!r}: give decreasing integers separated by commas, e.g. 999,499"
            ) from None
    if args.prompt is not None:
        s["prompt"] = args.prompt
        s["prompt_source"] = "text"
    if args.pil_min_side is not None:
        s["pil_resize"]["min_side"] = args.pil_min_side
    if args.batch_size is not None:
        s["batch_size"] = s["tiling"]["latent_tile_batch_size"] = args.batch_size
    for flag, key in (("tile_size", "latent_tile_size"), ("vae_tile_size", "vae_tile_size"),
                      ("vae_tile_overlap", "vae_overlap")):  # fmt: skip
        value = getattr(args, flag, None)
        if value is not None:
            s["tiling"][key] = value
    return s


# The flag that sets each setting, so that a bad value is reported in the user's own terms.
FLAGS = {
    "upscale.steps": "--steps/--timesteps",
    "upscale.psr_weight": "--psr-weight",
    "upscale.outscale": "--outscale",
    "upscale.jpeg_quality": "--jpeg-quality",
    "upscale.pil_resize.min_side": "--pil-min-side",
    "upscale.tiling.latent_tile_size": "--tile-size",
    "upscale.tiling.vae_tile_size": "--vae-tile-size",
    "upscale.tiling.vae_overlap": "--vae-tile-overlap",
}


def check_settings(s: dict) -> None:
    """Types and ranges of every setting (conf/upscale.yaml's schema) and how the tiling values relate."""
    try:
        check_schema(s, "upscale")
    except ConfigError as error:
        first = str(error).splitlines()[0]  # "upscale.key = value: what is allowed"
        key, _, rest = first.partition(" = ")
        flag = FLAGS.get(key)
        raise UsageError(f"{flag} {rest.replace(', or null', '')}" if flag and rest else first) from None
    tiling = s["tiling"]
    if tiling["vae_overlap"] >= tiling["vae_tile_size"]:
        raise UsageError(
            f"--vae-tile-size {tiling['vae_tile_size']} must exceed the VAE tile overlap ({tiling['vae_overlap']} px): "
            f"raise it, or lower --vae-tile-overlap"
        )
    if tiling["latent_overlap"] >= tiling["latent_tile_size"]:
        raise UsageError(
            f"--tile-size {tiling['latent_tile_size']} must exceed the latent tile overlap "
            f"({tiling['latent_overlap']} cells): raise it, or lower tiling.latent_overlap in conf/upscale.yaml"
        )


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N`, `mps`: a device that exists here, else UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type; use auto, cpu or cuda")
    return device


def check_model(folder: Path) -> None:
    """The student folder holds its manifest; a run directory is pointed to its `student/`."""
    if (folder / MANIFEST).is_file():
        return
    if (folder / "student" / MANIFEST).is_file():
        raise UsageError(
            f"--model {folder} is a run directory; give its exported student: --model {folder / 'student'}"
        )
    if not folder.exists():
        raise UsageError(
            f"--model {folder}: no such folder; give an exported student folder (<run dir>/student)"
        )
    raise UsageError(
        f"--model {folder} has no {MANIFEST}: give an exported student folder (<run dir>/student, written by "
        "training with export_student=true)"
    )


def check_writable(target: Path) -> None:
    """The folder `target` would be created in (its nearest existing ancestor) accepts new files."""
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"-o {target}: {existing} is a file, not a folder; choose another output path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"-o {target}: cannot write into {existing} ({error.strerror}); choose a writable output folder"
        ) from None
    if not os.access(existing, os.W_OK):
        raise UsageError(f"-o {target}: {existing} is not writable; choose a writable output folder")


def plan(args: argparse.Namespace, s: dict) -> list[tuple[Path, Path]]:
    """(input, output) pairs, or UsageError for an input or output that cannot work."""
    if not args.input.exists():
        raise UsageError(f"Input {args.input}: no such file or folder")
    if args.input.is_dir() and args.output.resolve() == args.input.resolve():
        raise UsageError(
            f"-o {args.output} is the input folder itself; choose another folder (e.g. {args.output}_x4)"
        )
    try:
        sources = list_images(args.input, exclude=args.output)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if not sources:
        raise UsageError(f"No images found under {args.input} (searched recursively for image files)")
    if args.input.is_file() and args.output.suffix != "":
        pairs = [(args.input, args.output)]
    else:
        try:
            pairs = plan_outputs(sources, args.input, args.output, suffix=s["suffix"], format=s["format"])
        except ValueError as error:
            raise UsageError(str(error)) from None
    check_writable(args.output.parent if len(pairs) == 1 and pairs[0][1] == args.output else args.output)
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        s = settings_from(args)
        check_settings(s)
        pairs = plan(args, s)
        device = resolve_device(s["device"])
        check_model(args.model)
    except UsageError as error:
        print(f"addsr-pl upscale: error: {error}", file=sys.stderr)
        return 2
    try:
        pipeline = AddSRPipeline.for_inference(args.model, s, device)
        pipeline.timesteps(s["steps"])  # a bad step count or timestep list fails here, before any image
    except (FileNotFoundError, ValueError) as error:
        print(f"addsr-pl upscale: error: {error}", file=sys.stderr)
        return 2
    # each image's failure or warning (e.g. 16-bit written as 8-bit) is one line on stderr, once
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("addsr_pl")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *_, **__: print(f"WARNING {message}", file=sys.stderr)
            report = Upscaler(pipeline, s).run(
                pairs, skip_existing=args.skip_existing, progress=not args.no_progress
            )
    finally:
        log.removeHandler(handler)
        log.propagate = True
    summary = f"{len(report.written)} written, {len(report.skipped)} skipped, {len(report.failed)} failed"
    print(summary + (" (each failure is reported above)" if report.failed else ""))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
