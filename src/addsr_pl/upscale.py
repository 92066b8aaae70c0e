"""`addsr-pl upscale INPUT -o OUTPUT --model DIR` (also `python -m addsr_pl.upscale`).

Exit codes: 0 every image written (or skipped as existing), 1 some image failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from addsr_pl.inference.io import list_images, plan_outputs
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.speed import COMPILE_MODES, COMPILE_SCOPES, PRECISION_CHOICES
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.paths import config_dir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="addsr-pl upscale", description="Super-resolve images with an AddSR student."
    )
    p.add_argument("input", type=Path, help="an image file or a folder (searched recursively)")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="output file or folder (mirrors the input tree)"
    )
    p.add_argument(
        "--model", type=Path, required=True, help="the exported student folder (<run dir>/student)"
    )
    p.add_argument("--steps", type=int, help="student steps, 1..4 (the first N student timesteps)")
    p.add_argument("--timesteps", help="explicit decreasing timesteps, e.g. 999,499")
    p.add_argument("--psr-weight", type=float, help="PSR blend of the prediction with the LR, in [0, 1]")
    p.add_argument("--prompt-source", choices=["tagger", "text", "none"], help="where the prompt comes from")
    p.add_argument("--prompt", help="prompt text (implies --prompt-source text)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--precision", choices=PRECISION_CHOICES, help="auto: bf16 on CUDA, fp32 on the CPU (student default)"
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last weights (student default)",
    )
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, help="TF32 for fp32 work on CUDA")
    p.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile mode (student default: none)")
    p.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        help="modules: each large module once | sampler: the whole sampler",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="the whole sampler as a CUDA graph per (steps, size, batch), captured once and replayed",
    )
    p.add_argument("--batch-size", type=int, help="same-size images (and latent tiles) per sampler call")
    p.add_argument(
        "--psr-decoder",
        choices=["vae", "tiny"],
        help="decoder of PSR's intermediate steps (tiny: the small one)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--outscale", type=float, help="output scale (the x4 result is resized to it)")
    p.add_argument("--color-fix", choices=["adain", "wavelet", "none"])
    p.add_argument(
        "--format", choices=["png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"], help="output format"
    )
    p.add_argument("--suffix", help="appended to output file names, e.g. _x4")
    p.add_argument(
        "--tile-size", type=int, help="latent tile side (latent cells) above which diffusion is tiled"
    )
    p.add_argument("--vae-tile-size", type=int, help="VAE tile side in pixels")
    p.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from(args: argparse.Namespace) -> dict:
    """conf/upscale.yaml with the given flags merged in."""
    s = OmegaConf.to_container(OmegaConf.load(config_dir() / "upscale.yaml"), resolve=True)
    for key in (
        "psr_weight",
        "seed",
        "precision",
        "device",
        "outscale",
        "color_fix",
        "format",
        "suffix",
        "prompt_source",
        "channels_last",
        "tf32",
        "compile",
        "compile_scope",
        "cuda_graph",
        "psr_decoder",
    ):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    if args.steps is not None:
        s["steps"] = args.steps
    if args.timesteps:
        s["steps"] = [int(t) for t in args.timesteps.split(",")]
    if args.prompt is not None:
        s["prompt"] = args.prompt
        s["prompt_source"] = "text"
    if args.batch_size is not None:
        s["batch_size"] = s["tiling"]["latent_tile_batch_size"] = args.batch_size
    if args.tile_size:
        s["tiling"]["latent_tile_size"] = args.tile_size
    if args.vae_tile_size:
        s["tiling"]["vae_tile_size"] = args.vae_tile_size
    return s


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parser().parse_args(argv)
    s = settings_from(args)
    if s["psr_weight"] is not None and not 0 <= s["psr_weight"] <= 1:
        print(f"--psr-weight {s['psr_weight']}: must lie in [0, 1]", file=sys.stderr)
        return 2
    if s["batch_size"] < 1:
        print(f"--batch-size {s['batch_size']}: must be at least 1", file=sys.stderr)
        return 2
    try:
        sources = list_images(args.input, exclude=args.output)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    if not sources:
        print(f"No images found under {args.input}", file=sys.stderr)
        return 2
    single_file = args.input.is_file() and args.output.suffix != ""
    if single_file:
        pairs = [(args.input, args.output)]
    else:
        pairs = plan_outputs(sources, args.input, args.output, suffix=s["suffix"], format=s["format"])
    device = resolve_device(s["device"])
    try:
        pipeline = AddSRPipeline.for_inference(args.model, s, device)
        pipeline.timesteps(s["steps"])  # a bad step count or timestep list fails here, before any image
    except (FileNotFoundError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    report = Upscaler(pipeline, s).run(pairs, skip_existing=args.skip_existing, progress=not args.no_progress)
    print(f"{len(report.written)} written, {len(report.skipped)} skipped, {len(report.failed)} failed")
    for source, reason in report.failed.items():
        print(f"FAILED {source}: {reason}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
