"""AddSRPipeline: the few-step student as an upscaler, from memory or from an exported folder."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from addsr_pl.core.sampler import Denoiser, StudentStep, sample_student, upscale
from addsr_pl.core.student_format import FORMAT, MANIFEST
from addsr_pl.inference.tiling import TiledDenoiser, TiledVaeCodec, plan_tiling
from addsr_pl.models.conditioning import Conditioner
from addsr_pl.models.diffusion import require_file
from addsr_pl.models.vae import VaeCodec


def _load_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class AddSRPipeline:
    """LR images in [0, 1] -> SR images in [0, 1], by the student sampler (`sample_student`).

    Args:
        student_timesteps: the student's timesteps; `steps=N` runs the first N of them.
        psr, psr_weight: prediction-based self-refinement and its blend with the LR.
        scale: the output size over the input size.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        codec: VaeCodec,
        conditioner: Conditioner,
        alphas_cumprod: Tensor,
        student_timesteps: list[int],
        psr: bool,
        psr_weight: float,
        scale: int,
    ):
        self.denoiser = denoiser
        self.codec = codec
        self.conditioner = conditioner
        self.alphas_cumprod = alphas_cumprod
        self.student_timesteps = list(student_timesteps)
        self.psr = psr
        self.psr_weight = psr_weight
        self.scale = scale
        # Output sizes are padded to a multiple of this: the VAE factor times the UNet's downsampling.
        self.unet_downsampling = 2 ** (len(denoiser.unet.config.block_out_channels) - 1)
        self.size_multiple = codec.scale_factor * self.unet_downsampling
        self.plan = None  # the TilingPlan of a pipeline made by `with_tiling`

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def with_tiling(self, height: int, width: int, tiling: dict) -> AddSRPipeline:
        """This pipeline for an output of height x width pixels, tiled where it exceeds the tile sizes.

        `tiling` holds the `tiling` section of `conf/upscale.yaml`: VAE tiles (pixels) and latent
        tiles (latent cells), their overlaps, the VAE tiles' context padding and GroupNorm statistics,
        the latent tiles' batch size and Gaussian weight width. Untiled stages keep their modules.
        """
        plan = plan_tiling(
            height,
            width,
            scale_factor=self.codec.scale_factor,
            vae_tile_size=tiling["vae_tile_size"],
            vae_overlap=tiling["vae_overlap"],
            latent_tile_size=tiling["latent_tile_size"],
            latent_overlap=tiling["latent_overlap"],
            latent_align=self.unet_downsampling,
        )
        tiled = copy.copy(self)
        tiled.plan = plan
        if plan.vae_tile_size is not None:
            tiled.codec = TiledVaeCodec(
                self.codec,
                tiling["vae_tile_size"],
                tiling["vae_overlap"],
                tiling["vae_padding"],
                stats_size=tiling["vae_stats_size"],
                statistics=tiling["vae_statistics"],
                output_device=None,
            )
        if plan.latent_tile_size is not None:
            tiled.denoiser = TiledDenoiser(
                self.denoiser,
                tiling["latent_tile_size"],
                tiling["latent_overlap"],
                tiling["latent_tile_batch_size"],
                tiling["latent_weight_sigma"],
                align=self.unet_downsampling,
            )
        return tiled

    def timesteps(self, steps: int | list[int] | None) -> list[int]:
        if steps is None:
            return self.student_timesteps
        if isinstance(steps, int):
            if not 1 <= steps <= len(self.student_timesteps):
                raise ValueError(f"steps = {steps}: must be between 1 and {len(self.student_timesteps)}")
            return self.student_timesteps[:steps]
        steps = [int(t) for t in steps]
        if any(a <= b for a, b in zip(steps, steps[1:])) or not all(
            0 <= t < len(self.alphas_cumprod) for t in steps
        ):
            raise ValueError(
                f"timesteps {steps}: must be strictly decreasing and in [0, {len(self.alphas_cumprod)})"
            )
        return steps

    @torch.no_grad()
    def run(
        self,
        lr: Tensor,
        steps: int | list[int] | None = None,
        psr_weight: float | None = None,
        generator: torch.Generator | None = None,
        manual_prompt: list[str] | None = None,
    ) -> list[StudentStep]:
        """All student steps for a batch of LR images (x0 decoded at the last step)."""
        lr = lr.to(self.device, torch.float32)
        h, w = lr.shape[-2] * self.scale, lr.shape[-1] * self.scale
        m = self.size_multiple
        lr_up = upscale(lr, (h, w))
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            lr_up = F.pad(
                lr_up, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"
            )
        timesteps = torch.tensor(self.timesteps(steps), device=self.device)
        text_embeds = self.conditioner.text_embeds(lr_up, manual=manual_prompt)
        start = self.codec.encode(lr_up)
        noises = [
            torch.randn(start.shape, generator=generator, device=self.device, dtype=start.dtype)
            for _ in range(len(timesteps))
        ]
        result = sample_student(
            self.denoiser,
            self.codec,
            lr_up=lr_up,
            text_embeds=text_embeds,
            represent=self.conditioner.represent,
            timesteps=timesteps,
            noises=noises,
            alphas_cumprod=self.alphas_cumprod,
            start_latent=start,
            psr=self.psr,
            psr_weight=self.psr_weight if psr_weight is None else psr_weight,
        )
        for step in result:
            step.control_image = step.control_image[..., :h, :w]
            if step.x0_image is not None:
                step.x0_image = step.x0_image[..., :h, :w]
        return result

    def __call__(self, lr: Tensor, **kwargs) -> Tensor:
        """SR images [B, 3, scale*h, scale*w] in [0, 1]."""
        return self.run(lr, **kwargs)[-1].x0_image

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AddSRPipeline:
        for module in (self.denoiser, self.codec, self.conditioner):
            module.to(device=device, dtype=dtype)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        """Load an exported student folder (`<run dir>/student/`)."""
        folder = Path(folder).expanduser()
        manifest_file = require_file(folder / MANIFEST, "exported student manifest", "--model")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{manifest_file} is not an addsr-pl student folder (format {manifest.get('format')!r})"
            )
        parts = {}
        for name, spec in manifest["components"].items():
            root = Path(spec["path"])
            root = root if root.is_absolute() else folder / root
            kwargs = {"subfolder": spec["subfolder"]} if "subfolder" in spec else {}
            location = root / spec.get("subfolder", "")
            require_file(
                location, f"student component '{name}'", f"components.{name}.path in {manifest_file}"
            )
            parts[name] = _load_class(spec["class"]).from_pretrained(root, **kwargs)
        sampler = manifest["sampler"]
        pipeline = cls(
            Denoiser(parts["unet"], parts["controlnet"], sampler["conditioning_scale"]).eval(),
            VaeCodec(parts["vae"]).eval(),
            Conditioner.from_config(
                parts["text_encoder"], parts["tokenizer"], parts["unet"], manifest["conditioning"]
            ).eval(),
            parts["scheduler"].alphas_cumprod.clone().float(),
            sampler["student_timesteps"],
            sampler["psr"],
            sampler["psr_weight"],
            manifest["scale"],
        )
        return pipeline.to(device, dtype)
