"""AddSRPipeline: the few-step student as an upscaler, from memory or from an exported folder."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from addsr_pl.core.noise_schedule import NoiseSchedule
from addsr_pl.core.sampler import NOISE_DRAWS, START_LATENTS, Denoiser, StudentStep, sample_student, upscale
from addsr_pl.core.student_format import DEFAULT_BACKBONE, MANIFEST, StudentFolderError
from addsr_pl.inference.compile_cache import CompileCache, architecture_digest, cache_key, default_root
from addsr_pl.inference.speed import (
    SamplerGraphs,
    SpeedSettings,
    apply_memory_format,
    apply_tf32,
    speed_settings,
)
from addsr_pl.inference.student import (
    check_tagger,
    first_line,
    load_component,
    locate_components,
    read_manifest,
    tagger_resolver,
)
from addsr_pl.inference.tiling import TiledDenoiser, TiledVaeCodec, plan_tiling
from addsr_pl.models.backbones import backbone
from addsr_pl.models.conditioning import Conditioner
from addsr_pl.models.vae import VaeCodec

log = logging.getLogger(__name__)


class AddSRPipeline:
    """LR images in [0, 1] -> SR images in [0, 1], by the student sampler (`sample_student`).

    Args:
        noise_schedule: the model's noise schedule (`core.noise_schedule`, from its scheduler): how latents
            are noised, x0 predicted, and which timestep the network is fed.
        student_timesteps: the student's timesteps (the schedule's); `steps=N` runs the first N of them.
        psr, psr_weight: prediction-based self-refinement and its blend with the LR.
        scale: the output size over the input size.
        psr_decoder: a small decoder for the intermediate x0s that only feed the next step's control
            image (`models.psr_decoder`); None decodes them with the VAE.
        speed_defaults: the speed settings this student was exported with (`SpeedSettings` keys).
        renoise: how steps after the first are noised (`sample_student`): `fresh` noise, as the AddSR
            student samples, or `ddim`, the deterministic sampler for a diffusion teacher's many steps.

    `run` returns every step (eager; validation reads them all); calling the pipeline returns the
    final image through the whole-sampler path that `with_speed` sets up (compiled and/or a CUDA
    graph per input signature).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        codec: VaeCodec,
        conditioner: Conditioner,
        noise_schedule: NoiseSchedule,
        student_timesteps: list,
        psr: bool,
        psr_weight: float,
        scale: int,
        psr_decoder: torch.nn.Module | None = None,
        speed_defaults: dict | None = None,
        renoise: str = "fresh",
    ):
        self.denoiser = denoiser
        self.codec = codec
        self.conditioner = conditioner
        self.noise_schedule = noise_schedule
        self.student_timesteps = list(student_timesteps)
        self.psr = psr
        self.psr_weight = psr_weight
        self.scale = scale
        # Output sizes are padded to a multiple of this: the VAE factor times the denoiser's downsampling.
        self.unet_downsampling = denoiser.downsampling
        self.size_multiple = codec.scale_factor * self.unet_downsampling
        self.latent_channels = codec.latent_channels
        self.plan = None  # the TilingPlan of a pipeline made by `with_tiling`
        self.psr_decoder = psr_decoder
        self.speed_defaults = speed_defaults
        self.renoise = renoise
        self.speed: SpeedSettings | None = None  # set by `with_speed`; None: plain eager
        self._compiled = None
        self._graphs: SamplerGraphs | None = None
        self.compile_cache: CompileCache | None = None  # set by `for_inference` when compiling

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
            # a lossless codec works block by block: it never needs tiles
            vae_tile_size=None if self.codec.lossless else tiling["vae_tile_size"],
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

    def timesteps(self, steps: int | list | None) -> list:
        if steps is None:
            return self.student_timesteps
        if isinstance(steps, int):
            if not 1 <= steps <= len(self.student_timesteps):
                raise ValueError(f"steps = {steps}: must be between 1 and {len(self.student_timesteps)}")
            return self.student_timesteps[:steps]
        # the schedule's kind of timestep: DDPM int, rectified-flow float
        steps = [type(self.student_timesteps[0])(t) for t in steps]
        self.noise_schedule.check_timesteps(steps)
        return steps

    def _inputs(
        self,
        lr: Tensor,
        steps: int | list[int] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        manual_prompt: list[str] | None,
        lr_up: Tensor | None = None,
        start_latent: str = "mean",
        noise: str = "per_image",
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, list[Tensor]]:
        """(padded lr_up, text embeddings, step 1's representation, timesteps, the VAE posterior's noise
        or None, noises): everything `final_image` takes, the prompt's tags and the representation from
        one tagger forward, on the host (strings, the tokenizer, the text-embedding cache)."""
        lr, lr_up, timesteps, posterior_noise, noises = self._draws(
            lr, steps, generator, lr_up, start_latent, noise
        )
        conditioning = self.conditioner.condition(
            self.conditioner.first_step_image(lr, lr_up), manual=manual_prompt
        )
        return lr_up, conditioning.text_embeds, conditioning.image_embeds, timesteps, posterior_noise, noises

    def _device_inputs(
        self,
        lr: Tensor,
        steps: int | list[int] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        manual_prompt: list[str] | None,
        lr_up: Tensor | None = None,
        start_latent: str = "mean",
        noise: str = "per_image",
    ) -> list[Tensor | None]:
        """What `sampled_image` takes: [padded lr_up, the tagger's step-1 image (None without a tagger),
        the prompts' frame and joined flags (`Conditioner.prompt_frame`), timesteps, the VAE
        posterior's noise or None, *noises]; the conditioning itself is left to the call."""
        lr, lr_up, timesteps, posterior_noise, noises = self._draws(
            lr, steps, generator, lr_up, start_latent, noise
        )
        conditioner = self.conditioner
        tagger_image = None if conditioner.tagger is None else conditioner.first_step_image(lr, lr_up)
        frame, joined = conditioner.prompt_frame(lr.shape[0], manual_prompt, self.device)
        return [lr_up, tagger_image, frame, joined, timesteps, posterior_noise, *noises]

    def _draws(
        self,
        lr: Tensor,
        steps: int | list[int] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        lr_up: Tensor | None,
        start_latent: str,
        noise: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, list[Tensor]]:
        """(lr on the device, padded lr_up, timesteps, the VAE posterior's noise or None, noises): the
        sampler's inputs besides the conditioning. A given `lr_up` (e.g. the official script's PIL
        upscale) is used as it is."""
        if start_latent not in START_LATENTS:
            raise ValueError(f"start_latent = {start_latent!r}: must be one of {', '.join(START_LATENTS)}")
        if noise not in NOISE_DRAWS:
            raise ValueError(f"noise = {noise!r}: must be one of {', '.join(NOISE_DRAWS)}")
        lr = lr.to(self.device, torch.float32)
        if lr_up is None:
            h, w = lr.shape[-2] * self.scale, lr.shape[-1] * self.scale
            m = self.size_multiple
            lr_up = upscale(lr, (h, w))
            pad_h, pad_w = (-h) % m, (-w) % m
            if pad_h or pad_w:
                lr_up = F.pad(
                    lr_up,
                    (0, pad_w, 0, pad_h),
                    mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate",
                )
        else:
            lr_up = lr_up.to(self.device, torch.float32)
        timesteps = torch.tensor(self.timesteps(steps), device=self.device)
        shape = (lr.shape[0], self.latent_channels, lr_up.shape[-2] // self.codec.scale_factor,
                 lr_up.shape[-1] // self.codec.scale_factor)  # fmt: skip
        if noise == "official":
            posterior_noise, noises = self.official_noise(shape, generator, timesteps)
        else:
            noises = [self.noise(shape, generator) for _ in range(len(timesteps))]
            posterior_noise = self.noise(shape, generator) if start_latent == "sample" else None
        if start_latent == "mean":
            posterior_noise = None
        return lr, lr_up, timesteps, posterior_noise, noises

    def official_noise(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        timesteps: Tensor,
    ) -> tuple[Tensor, list[Tensor]]:
        """(posterior noise, step noises) drawn as the official pipeline draws them, per image: the start
        noise from the seeded generator; then, from torch's global generator, which the official script
        seeds with the same seed, the VAE posterior's sample, one draw of the start timestep and each
        later step's fresh noise. A second generator in the seeded state stands in for the global one,
        which is left alone."""
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * shape[0]
        if len(generators) != shape[0] or any(g is None for g in generators):
            raise ValueError("noise = 'official' needs one seeded generator per image")
        single = (1, *shape[1:])
        starts, posteriors, later = [], [], []
        for g in generators:
            second = torch.Generator(device=g.device)
            second.set_state(g.get_state())
            starts.append(torch.randn(single, generator=g, device=self.device))
            posteriors.append(torch.randn(single, generator=second, device=self.device))
            first = int(timesteps[0])
            torch.randint(first, first + 1, (1,), generator=second, device=self.device)  # the start step
            later.append([torch.randn(single, generator=second, device=self.device) for _ in timesteps[1:]])
        noises = [torch.cat(starts)] + [torch.cat(step) for step in zip(*later)]
        return torch.cat(posteriors), noises

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None
    ) -> Tensor:
        """Gaussian noise of `shape`; a list of generators draws each sample from its own, so an image's
        result does not depend on the batch it shares."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per image")
            return torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=self.device) for g in generator]
            )
        return torch.randn(shape, generator=generator, device=self.device)

    def _decoder(self, psr_decoder: str | None):
        """The intermediate decoder of `psr_decoder`: vae | tiny | None (tiny where the student has one)."""
        if psr_decoder not in (None, "vae", "tiny"):
            raise ValueError(f"psr_decoder = {psr_decoder!r}: must be 'vae' or 'tiny'")
        if psr_decoder == "tiny" and self.psr_decoder is None:
            raise ValueError(
                "psr_decoder = 'tiny', but this student has no small PSR decoder: distil one with "
                "stage=psr_decoder (exported beside the student) or use psr_decoder=vae"
            )
        return None if psr_decoder == "vae" else self.psr_decoder

    def _sample(self, inputs: list, constants: tuple) -> list[StudentStep]:
        lr_up, text_embeds, representation, timesteps, posterior_noise, *noises = inputs
        psr_weight, psr_decoder = constants
        dtype = next(self.denoiser.parameters()).dtype
        return sample_student(
            self.denoiser,
            self.codec,
            lr_up=lr_up,
            text_embeds=text_embeds.to(dtype),
            represent=self.conditioner.represent,
            timesteps=timesteps,
            noises=[n.to(dtype) for n in noises],
            noise_schedule=self.noise_schedule,
            start_latent=self.codec.encode(lr_up)
            if posterior_noise is None
            else self.codec.encode(lr_up, posterior_noise),
            psr=self.psr,
            psr_weight=psr_weight,
            first_representation=representation,
            psr_decoder=self._decoder(psr_decoder),
            renoise=self.renoise,
        )

    def final_image(self, inputs: list, constants: tuple) -> Tensor:
        """The whole sampler, from the prepared inputs to the last step's image (the conditioning
        computed before): what `torch.compile` and the CUDA graphs take where the prompts go through
        strings (`_whole_call`). inputs: [lr_up, text_embeds, representation, timesteps, posterior
        noise or None, *noises]; constants: (psr_weight, psr_decoder)."""
        return self._sample(inputs, constants)[-1].x0_image

    def sampled_image(self, inputs: list, constants: tuple) -> Tensor:
        """The whole call as one function of tensors, conditioning included: the tagger's pass, the tag
        mask, the prompts' token ids, the text encoder, then `final_image`. What `torch.compile` and
        the CUDA graphs take where the conditioner builds its prompts on the device. inputs:
        `_device_inputs`'s; constants: (psr_weight, psr_decoder)."""
        lr_up, tagger_image, frame, joined, *draws = inputs
        conditioning = self.conditioner.condition_on_device(tagger_image, frame, joined)
        return self.final_image(
            [lr_up, conditioning.text_embeds, conditioning.image_embeds, *draws], constants
        )

    def _whole_call(self):
        """`__call__`'s function and how its inputs are made: the conditioning inside (`sampled_image`)
        where the conditioner builds its prompts on the device, else computed before (`final_image`)."""
        if self.conditioner.device_prompts:
            return self.sampled_image, self._device_inputs
        return self.final_image, self._host_inputs

    def _host_inputs(self, *args, **options) -> list[Tensor | None]:
        """`_inputs` as `final_image` takes them: [lr_up, text_embeds, representation, timesteps,
        posterior noise or None, *noises]."""
        *inputs, noises = self._inputs(*args, **options)
        return [*inputs, *noises]

    def _prepare(self, lr, steps, psr_weight, generator, manual_prompt, psr_decoder, **options):
        """((output height, width), `final_image`'s inputs, its constants) for `run`; `options`: `lr_up`,
        `start_latent`, `noise` of `_inputs`."""
        inputs = self._host_inputs(lr, steps, generator, manual_prompt, **options)
        return self._size(lr, inputs[0], options), inputs, self._constants(psr_weight, psr_decoder)

    def _size(self, lr: Tensor, lr_up: Tensor, options: dict) -> tuple[int, int]:
        if options.get("lr_up") is not None:
            return tuple(lr_up.shape[-2:])
        return (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale)

    def _constants(self, psr_weight: float | None, psr_decoder: str | None) -> tuple:
        return (self.psr_weight if psr_weight is None else float(psr_weight), psr_decoder)

    @torch.no_grad()
    def run(
        self,
        lr: Tensor,
        steps: int | list[int] | None = None,
        psr_weight: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        manual_prompt: list[str] | None = None,
        psr_decoder: str | None = None,
        **options,
    ) -> list[StudentStep]:
        """All student steps for a batch of LR images (x0 decoded at the last step), eagerly.
        `options`: `lr_up`, `start_latent`, `noise` (see `__call__`)."""
        (h, w), inputs, constants = self._prepare(
            lr, steps, psr_weight, generator, manual_prompt, psr_decoder, **options
        )
        result = self._sample(inputs, constants)
        for step in result:
            step.control_image = step.control_image[..., :h, :w]
            if step.x0_image is not None:
                step.x0_image = step.x0_image[..., :h, :w]
        return result

    @torch.no_grad()
    def __call__(
        self,
        lr: Tensor,
        steps: int | list[int] | None = None,
        psr_weight: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        manual_prompt: list[str] | None = None,
        psr_decoder: str | None = None,
        lr_up: Tensor | None = None,
        start_latent: str = "mean",
        noise: str = "per_image",
    ) -> Tensor:
        """SR images [B, 3, scale*h, scale*w] in [0, 1], through the compiled / graphed sampler where
        `with_speed` set one up and the run is untiled (tiled runs stay eager). The conditioning runs
        inside it where the conditioner builds its prompts on the device (`sampled_image`).

        `lr_up`: the control image of step 1 at the output size, made by the caller (None: the bicubic
        upscale of `lr`, padded); `start_latent`: the encoded `lr_up`'s posterior `mean` or a `sample`
        of it (official); `noise`: `per_image` draws from each image's generator, `official` in the
        official pipeline's order (`official_noise`)."""
        function, make_inputs = self._whole_call()
        options = {"lr_up": lr_up, "start_latent": start_latent, "noise": noise}
        inputs = make_inputs(lr, steps, generator, manual_prompt, **options)
        (h, w), constants = self._size(lr, inputs[0], options), self._constants(psr_weight, psr_decoder)
        tiled = self.plan is not None and (self.plan.vae_tile_size or self.plan.latent_tile_size)
        if self._graphs is not None and not tiled:
            try:
                return self._graphs(inputs, constants)[..., :h, :w]
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as error:  # a module that cannot be captured: say so, run eagerly
                log.warning(
                    "CUDA graph capture failed (%s); running eagerly. --no-cuda-graph skips it.", error
                )
                self._graphs = None
        if self.speed is not None and self.speed.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # torch's own CUDA graphs: a new step begins
        if self._compiled is not None and not tiled:
            image = self._compiled(inputs, constants).clone()
        else:
            image = function(inputs, constants).clone()
        return image[..., :h, :w]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AddSRPipeline:
        modules = [self.denoiser, self.codec, self.conditioner]
        for module in modules + ([self.psr_decoder] if self.psr_decoder is not None else []):
            module.to(device=device, dtype=dtype)
        self.noise_schedule.to(device)
        return self

    def compiled_modules(self) -> list[torch.nn.Module]:
        """What `compile_scope: modules` compiles: each runs once or more per step with fixed shapes."""
        modules = [self.denoiser, self.codec.vae.encoder, self.codec.vae.decoder]
        tagger = self.conditioner.tagger
        if tagger is not None and hasattr(tagger, "ram"):
            modules.append(tagger.ram.visual_encoder)
        if self.psr_decoder is not None:
            modules.append(self.psr_decoder.autoencoder.decoder)
        return modules

    def with_speed(self, speed: SpeedSettings, device: torch.device | str) -> AddSRPipeline:
        """This pipeline on `device` with `speed`: precision, channels_last, TF32, and the whole-sampler
        `torch.compile` and/or CUDA graphs used by `__call__`. Changes the pipeline in place."""
        device = torch.device(device)
        self.to(device, speed.dtype(device))
        convolutional = [*self.denoiser.networks().values(), self.codec.vae]
        apply_memory_format(convolutional + ([self.psr_decoder] if self.psr_decoder is not None else []),
                            speed.channels_last)  # fmt: skip
        apply_tf32(device, speed.tf32)
        self.speed = speed
        function = whole = self._whole_call()[0]
        self._compiled = None
        if speed.compile != "none" and speed.compile_scope == "sampler":
            function = self._compiled = torch.compile(whole, mode=speed.compile, dynamic=False)
        elif speed.compile != "none":
            for module in self.compiled_modules():
                module.compile(mode=speed.compile, dynamic=False)
        self._graphs = (
            SamplerGraphs(function, speed.cuda_graph_warmup, speed.cuda_graph_cache)
            if speed.graphs_on(device)
            else None
        )
        return self

    @classmethod
    def for_inference(cls, folder: str | Path, settings: dict, device: torch.device | str) -> AddSRPipeline:
        """An exported student with the speed settings of `settings` (`conf/upscale.yaml` plus flags; a
        null key takes the student's default) on `device`; weight references are found through
        `settings["weights_dir"]`."""
        pipeline = cls.from_folder(folder, weights_dir=settings.get("weights_dir"))
        speed = speed_settings(settings, pipeline.speed_defaults)
        pipeline.with_speed(speed, device)
        if speed.compile != "none":
            pipeline.compile_cache = pipeline.compile_cache_for(
                (Path(folder) / MANIFEST).read_text(),
                settings.get("compile_cache") or default_root(),
                settings.get("compile_estimate_s", 0),
            )
            pipeline.compile_cache.activate()
        return pipeline

    def compile_cache_for(self, manifest: str, root: str | Path, estimate_s: float) -> CompileCache:
        """The compile cache entry of this pipeline as `with_speed` set it up (`inference.compile_cache`)."""
        modules = [self.denoiser, self.codec, self.conditioner]
        modules += [self.psr_decoder] if self.psr_decoder is not None else []
        dtype = next(self.denoiser.parameters()).dtype
        key = cache_key(architecture_digest(manifest, modules), dtype, self.device, self.speed.as_dict())
        return CompileCache(root, key, estimate_s)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights_dir: str | Path | None = None,
    ):
        """Load an exported student folder (`<run dir>/student/`).

        The folder is data from anywhere (`inference.student`): its manifest and every file it names are
        checked before any weight is read, components are made only from the known classes, weights only
        from safetensors. `weights_dir` is where `{"weights": ...}` references are found after the folder
        itself (then `$ADDSR_PL_WEIGHTS`, `./weights`). Any problem: `StudentFolderError`, one line.
        """
        manifest_file, manifest = read_manifest(folder)
        located = locate_components(manifest_file, manifest, weights_dir)
        check_tagger(manifest_file, manifest["conditioning"], weights_dir)
        parts = {name: load_component(name, *where) for name, where in located.items()}
        sampler = manifest["sampler"]
        family = backbone(manifest.get("backbone", DEFAULT_BACKBONE))
        try:
            noise_schedule = family.noise_schedule(parts, "student")
        except ValueError as error:
            raise StudentFolderError(f"{manifest_file}: {error}") from None
        try:
            noise_schedule.check_timesteps(sampler["student_timesteps"])
        except ValueError as error:
            raise StudentFolderError(
                f"{manifest_file}: sampler.student_timesteps: {error} for its scheduler; re-export the student"
            ) from None
        psr_decoder = None
        if "psr_decoder" in parts:
            from addsr_pl.models.psr_decoder import PsrDecoder

            psr_decoder = PsrDecoder(parts["psr_decoder"]).eval()
        try:
            conditioner = family.conditioner(
                parts, manifest["conditioning"], resolve=tagger_resolver(manifest_file, weights_dir)
            ).eval()
        except StudentFolderError:
            raise
        except Exception as error:  # a tagger file that does not load: this folder's problem, one line
            raise StudentFolderError(
                f"{manifest_file}: cannot build the tagger ({first_line(error)})"
            ) from None
        codec = VaeCodec(parts["vae"]).eval()
        networks = {name: parts[name] for name in family.networks}
        pipeline = cls(
            family.denoiser(networks, codec, sampler["conditioning_scale"]).eval(),
            codec,
            conditioner,
            noise_schedule,
            sampler["student_timesteps"],
            sampler["psr"],
            sampler["psr_weight"],
            manifest["scale"],
            psr_decoder=psr_decoder,
            speed_defaults=manifest.get("speed"),
        )
        return pipeline.to(device, dtype)
