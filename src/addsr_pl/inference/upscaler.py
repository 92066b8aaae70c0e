"""Upscaling image files with an AddSRPipeline: sizes, tiling, colour fix, outscale, alpha, failures."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from addsr_pl.core.sampler import upscale
from addsr_pl.inference.colorfix import color_fix
from addsr_pl.inference.io import ImageReadError, LoadedImage, read_image, upscale_alpha, write_image
from addsr_pl.inference.pipeline import AddSRPipeline

log = logging.getLogger(__name__)


class ImageSizeError(ValueError):
    """An input the upscaler refuses because of its size."""


@dataclass
class UpscaleReport:
    """What a batch of files came to: written outputs, skipped existing ones, failures with reasons."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    seconds: dict[Path, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class Upscaler:
    """An AddSRPipeline applied to whole images.

    Args:
        pipeline: the student (e.g. `AddSRPipeline.from_folder(<run dir>/student)`).
        settings: `conf/upscale.yaml` as a dict, command-line values merged in; `steps` is a step count
            or a list of timesteps; `prompt` the text of `prompt_source: text`.
    """

    def __init__(self, pipeline: AddSRPipeline, settings: dict):
        self.pipeline = pipeline
        self.settings = settings
        source = settings["prompt_source"]
        encoder = pipeline.conditioner.prompt_encoder
        if source == "text":
            encoder.prompt = "manual"
        elif source == "none":
            encoder.prompt = "none"
        elif source != "tagger":
            raise ValueError(f"prompt_source = {source!r}: must be one of ['tagger', 'text', 'none']")

    def check_size(self, path: Path, height: int, width: int) -> None:
        limits = self.settings["limits"]
        if min(height, width) < limits["min_input_side"]:
            raise ImageSizeError(
                f"{path} is {width}x{height}: smaller than {limits['min_input_side']} px on a side. "
                "Upscale it with a plain resize first, or lower limits.min_input_side."
            )
        scale = self.pipeline.scale
        if height * width * scale * scale > limits["max_output_pixels"]:
            raise ImageSizeError(
                f"{path} is {width}x{height}: its x{scale} output exceeds limits.max_output_pixels "
                f"({limits['max_output_pixels']}). Split the image, or raise the limit if memory and time allow."
            )

    @torch.no_grad()
    def upscale_tensor(self, lr: Tensor, path: Path | None = None) -> Tensor:
        """[B, 3, h, w] in [0, 1] -> [B, 3, H, W] in [0, 1] at the output scale (colour fixed)."""
        s = self.settings
        height, width = lr.shape[-2] * self.pipeline.scale, lr.shape[-1] * self.pipeline.scale
        pad = self.pipeline.size_multiple
        pipeline = self.pipeline.with_tiling(height + (-height) % pad, width + (-width) % pad, s["tiling"])
        generator = torch.Generator(device=pipeline.device).manual_seed(int(s["seed"]))
        manual = [s.get("prompt") or ""] * lr.shape[0] if s["prompt_source"] == "text" else None
        sr = pipeline(
            lr, steps=s["steps"], psr_weight=s["psr_weight"], generator=generator, manual_prompt=manual
        )
        reference = upscale(lr.to(sr.device, sr.dtype), (height, width))
        sr = color_fix(s["color_fix"], sr, reference, wavelet_levels=s["wavelet_levels"]).clamp(0, 1)
        if s["outscale"] and float(s["outscale"]) != self.pipeline.scale:
            size = (round(lr.shape[-2] * float(s["outscale"])), round(lr.shape[-1] * float(s["outscale"])))
            sr = F.interpolate(sr, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if path is not None and pipeline.plan is not None:
            log.info("%s: %s", path, pipeline.plan.describe())
        return sr

    def upscale_image(self, image: LoadedImage) -> tuple[Tensor, Tensor | None]:
        """The output RGB [3, H, W] and the alpha upscaled to match (or None)."""
        self.check_size(image.path, *image.size)
        sr = self.upscale_tensor(image.rgb[None], image.path)[0].float().cpu()
        alpha = upscale_alpha(image.alpha, tuple(sr.shape[-2:])) if image.alpha is not None else None
        return sr, alpha

    def run(
        self, pairs: list[tuple[Path, Path]], skip_existing: bool = False, progress: bool = True
    ) -> UpscaleReport:
        """Upscale every (input, output) pair; a file that fails is reported and the rest go on."""
        report = UpscaleReport()
        for source, target in tqdm(pairs, desc="upscale", unit="image", disable=not progress):
            if skip_existing and target.exists():
                report.skipped.append(target)
                continue
            start = time.perf_counter()
            try:
                image = read_image(source)
                sr, alpha = self.upscale_image(image)
                target.parent.mkdir(parents=True, exist_ok=True)
                written = write_image(
                    target, sr, like=image, alpha=alpha, format=self.settings["format"],
                    quality=self.settings["jpeg_quality"],
                )  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                report.failed[source] = (
                    "out of GPU memory: lower tiling.latent_tile_size / tiling.vae_tile_size"
                )
                log.error("skipped %s: %s", source, report.failed[source])
                continue
            except (ImageReadError, ImageSizeError, OSError, ValueError, RuntimeError) as error:
                # one image that fails (even inside the model) is reported; the batch goes on
                report.failed[source] = (
                    str(error) if not isinstance(error, RuntimeError) else f"{type(error).__name__}: {error}"
                )
                log.error("skipped %s: %s", source, report.failed[source])
                continue
            report.written.append(written)
            report.seconds[source] = time.perf_counter() - start
        return report
