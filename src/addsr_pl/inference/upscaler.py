"""Upscaling image files with an AddSRPipeline: sizes, tiling, colour fix, outscale, alpha, failures."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from addsr_pl.core.sampler import upscale
from addsr_pl.inference.colorfix import color_fix
from addsr_pl.inference.io import ImageReadError, LoadedImage, read_image, upscale_alpha, write_image
from addsr_pl.inference.overlap import BackgroundReader, BackgroundWriter
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


def quantize(images: Tensor, mode: str = "round") -> Tensor:
    """Images in [0, 1] through 8 bits: `round` as diffusers' pipeline output, `floor` as torchvision's
    `ToPILImage` (which truncates)."""
    scaled = images.clamp(0, 1) * 255
    return (scaled.round() if mode == "round" else scaled.floor()) / 255


def pil_resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, 3, h, w] in [0, 1] -> [B, 3, *size] through 8-bit PIL images and PIL's bicubic filter (its
    kernel has a = -0.5 and widens when shrinking; torch's has a = -0.75 and does not)."""
    height, width = size
    out = []
    for image in quantize(images).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    return torch.stack(out).to(images.device, torch.float32) / 255


def pil_upscale(lr: Tensor, scale: int, min_side: int, multiple: int) -> Tensor:
    """The official script's control image: the 8-bit LR, its short side first enlarged to `min_side`
    (sides truncated to integers), then x`scale`, then resized to sides floored to `multiple`, each
    by PIL's bicubic filter."""
    images = quantize(lr)
    height, width = images.shape[-2:]
    if min(height, width) < min_side:
        factor = min_side / min(height, width)
        images = pil_resize(images, (int(factor * height), int(factor * width)))
        height, width = images.shape[-2:]
    images = pil_resize(images, (height * scale, width * scale))
    floored = (height * scale // multiple * multiple, width * scale // multiple * multiple)
    return images if floored == tuple(images.shape[-2:]) else pil_resize(images, floored)


class Upscaler:
    """An AddSRPipeline applied to whole images.

    Args:
        pipeline: the student (e.g. `AddSRPipeline.from_folder(<run dir>/student)`).
        settings: `conf/upscale.yaml` as a dict, command-line values merged in; `steps` is a step count
            or a list of timesteps; `prompt` the text of `prompt_source: text`; `batch_size` images of
            the same size share one sampler call (and latent tiles go `tiling.latent_tile_batch_size`
            at a time).

    Every image draws its noise from its own generator seeded with `seed`, so its output does not
    depend on the batch it shares.

    The settings that restore the official `test_addsr.py` (each one departure; `--official` sets all):
    `resize: pil` (the 8-bit PIL pipeline of `pil_upscale`, the output resized back by PIL),
    `start_latent: sample`, `noise: official`, `prompt_join: official`, `tagger_input: lr_bilinear`
    (the last two override the student's conditioning when not null).
    """

    def __init__(self, pipeline: AddSRPipeline, settings: dict):
        self.pipeline = pipeline
        self.settings = settings
        self.reader: BackgroundReader | None = None  # the running `run`'s reader
        self._announced: set[tuple] = set()  # compiled signatures already announced
        conditioner = pipeline.conditioner
        if settings.get("prompt_join") is not None:
            conditioner.prompt_encoder.prompt_join = settings["prompt_join"]
        if settings.get("tagger_input") is not None:
            conditioner.inference_tagger_input = settings["tagger_input"]
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
        official_resize = s.get("resize", "torch") == "pil"
        lr_up = None
        if official_resize:
            lr = quantize(lr)
            lr_up = pil_upscale(
                lr, self.pipeline.scale, s["pil_resize"]["min_side"], s["pil_resize"]["multiple"]
            )
            pipeline = self.pipeline.with_tiling(*lr_up.shape[-2:], s["tiling"])
        else:
            pad = self.pipeline.size_multiple
            pipeline = self.pipeline.with_tiling(
                height + (-height) % pad, width + (-width) % pad, s["tiling"]
            )
        generators = [
            torch.Generator(device=pipeline.device).manual_seed(int(s["seed"])) for _ in range(lr.shape[0])
        ]
        manual = [s.get("prompt") or ""] * lr.shape[0] if s["prompt_source"] == "text" else None
        sr = pipeline(
            lr,
            steps=s["steps"],
            psr_weight=s["psr_weight"],
            generator=generators,
            manual_prompt=manual,
            psr_decoder=s.get("psr_decoder"),
            lr_up=lr_up,
            start_latent=s.get("start_latent", "mean"),
            noise=s.get("noise", "per_image"),
        )
        if official_resize:
            # the official order: 8-bit output, colour fix against the 8-bit upscale (truncated back to
            # 8 bits by ToPILImage), then PIL's resize to the x4 size of the input
            sr = quantize(sr)
            if s["color_fix"] != "none":
                fixed = color_fix(s["color_fix"], sr, lr_up.to(sr.device), wavelet_levels=s["wavelet_levels"])
                sr = quantize(fixed, "floor")
            if tuple(sr.shape[-2:]) != (height, width):
                sr = pil_resize(sr, (height, width))
        else:
            reference = upscale(lr.to(sr.device, sr.dtype), (height, width))
            sr = color_fix(s["color_fix"], sr, reference, wavelet_levels=s["wavelet_levels"]).clamp(0, 1)
        if s["outscale"] and float(s["outscale"]) != self.pipeline.scale:
            size = (round(lr.shape[-2] * float(s["outscale"])), round(lr.shape[-1] * float(s["outscale"])))
            sr = F.interpolate(sr, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if path is not None and pipeline.plan is not None:
            log.info("%s: %s", path, pipeline.plan.describe())
        return sr

    def upscale_images(self, images: list[LoadedImage]) -> list[tuple[Tensor, Tensor | None]]:
        """Same-size images in one sampler call: for each, the output RGB [3, H, W] and its alpha (or None)."""
        for image in images:
            self.check_size(image.path, *image.size)
        if len({tuple(image.rgb.shape) for image in images}) != 1:
            raise ValueError("upscale_images takes images of one size; group them first")
        path = images[0].path if len(images) == 1 else None
        sr = self.upscale_tensor(torch.stack([image.rgb for image in images]), path).float().cpu()
        return [
            (out, upscale_alpha(image.alpha, tuple(out.shape[-2:])) if image.alpha is not None else None)
            for out, image in zip(sr, images)
        ]

    def upscale_image(self, image: LoadedImage) -> tuple[Tensor, Tensor | None]:
        """The output RGB [3, H, W] and the alpha upscaled to match (or None)."""
        return self.upscale_images([image])[0]

    def _fail(self, report: UpscaleReport, source: Path, reason: str) -> None:
        report.failed[source] = reason
        log.error("skipped %s: %s", source, reason)

    def run(
        self, pairs: list[tuple[Path, Path]], skip_existing: bool = False, progress: bool = True
    ) -> UpscaleReport:
        """Upscale every (input, output) pair; a file that fails is reported and the rest go on.

        Files are read and decoded by a background thread (`prefetch` images ahead of the model) and
        the results encoded and written by another (`write_queue` waiting at most), so that the disk
        and the codecs work while the sampler runs. Images of one size are gathered into sampler calls
        of `batch_size`; while mixed sizes wait, the group waiting longest goes when `prefetch` images
        (or `batch_size`, if more) are held.
        """
        report = UpscaleReport()
        batch_size = int(self.settings["batch_size"])
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: must be >= 1")
        todo = [(s, t) for s, t in pairs if not (skip_existing and t.exists())]
        report.skipped = [t for s, t in pairs if skip_existing and t.exists()]
        bar = tqdm(total=len(todo), desc="upscale", unit="image", disable=not progress)
        prefetch = int(self.settings["prefetch"])
        hold = max(batch_size, prefetch)
        self.reader = BackgroundReader(todo, self._read, prefetch)
        writer = BackgroundWriter(lambda job: self._write(job, report), int(self.settings["write_queue"]))
        waiting: dict[tuple[int, ...], list[tuple[LoadedImage, Path]]] = {}
        try:
            for (source, target), image in self.reader:
                if isinstance(image, Exception):
                    self._fail(report, source, str(image))
                    bar.update()
                    continue
                group = waiting.setdefault(tuple(image.rgb.shape), [])
                group.append((image, target))
                if len(group) < batch_size and sum(map(len, waiting.values())) < hold:
                    continue
                # a full group goes; else (mixed sizes) the one waiting longest
                ready = waiting.pop(
                    tuple(image.rgb.shape) if len(group) == batch_size else next(iter(waiting))
                )
                self._run_group(ready, report, writer)
                bar.update(len(ready))
            for group in waiting.values():
                self._run_group(group, report, writer)
                bar.update(len(group))
        finally:
            writer.close()
            bar.close()
        return report

    def _read(self, pair: tuple[Path, Path]) -> LoadedImage | Exception:
        """The reader thread's work: one file decoded and checked, or the error that makes it fail."""
        source, _ = pair
        try:
            # the size is checked from the header: a decompression bomb is never decoded
            image = read_image(source, self.settings["limits"]["max_input_pixels"])
            self.check_size(image.path, *image.size)
        except (ImageReadError, ImageSizeError, OSError, ValueError) as error:
            return error
        return image

    def _write(
        self, job: tuple[LoadedImage, Path, Tensor, Tensor | None, float], report: UpscaleReport
    ) -> None:
        """The writer thread's work: one result encoded and written, or its failure reported."""
        image, target, sr, alpha, seconds = job
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            written = write_image(
                target, sr, like=image, alpha=alpha, format=self.settings["format"],
                quality=self.settings["jpeg_quality"],
            )  # fmt: skip
        except (OSError, ValueError) as error:
            self._fail(report, image.path, str(error))
            return
        report.written.append(written)
        report.seconds[image.path] = seconds

    def _signature(self, images: list[LoadedImage]) -> tuple:
        """What a compiled sampler call's graphs depend on, as the compile cache records it."""
        s = self.settings
        return (len(images), *images[0].rgb.shape, str(s["steps"]), s.get("psr_decoder"), s.get("resize"))

    def _run_group(
        self, group: list[tuple[LoadedImage, Path]], report: UpscaleReport, writer: BackgroundWriter
    ) -> None:
        start = time.perf_counter()
        images = [image for image, _ in group]
        cache = self.pipeline.compile_cache
        signature = self._signature(images)
        announce = cache is not None and signature not in self._announced
        try:
            if announce:
                self._announced.add(signature)
                log.info("%s", cache.before(signature))
            outputs = self.upscale_images(images)
        except (ImageSizeError, ValueError) as error:
            for image in images:
                self._fail(report, image.path, str(error))
            return
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            for image in images:
                self._fail(
                    report,
                    image.path,
                    "out of GPU memory: lower --batch-size, tiling.latent_tile_size / tiling.vae_tile_size",
                )
            return
        except RuntimeError as error:  # one group that fails inside the model is reported; the run goes on
            for image in images:
                self._fail(report, image.path, f"{type(error).__name__}: {error}")
            return
        if announce:
            seconds, loaded, compiled = cache.after(signature)
            log.info(
                "first call %.1f s: %d graphs loaded from %s, %d compiled",
                seconds,
                loaded,
                cache.folder,
                compiled,
            )
        seconds = (time.perf_counter() - start) / len(group)
        for (image, target), (sr, alpha) in zip(group, outputs):
            writer.submit((image, target, sr, alpha, seconds))
