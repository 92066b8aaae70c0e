"""The training iteration's speed settings (`method.speed`): what the inference path does for its sampler
(channels_last, TF32, `torch.compile`, CUDA graphs), done for the two halves of Fig. 2.

* The frozen half runs without gradients: the VAE encodes of the HR and the upscaled LR, the teacher's
  forward at its timesteps with its x0 decode, and the discriminator's conditioning. Each is a function of
  tensors (`FrozenRegion`), compiled and, on CUDA, captured as a CUDA graph per input signature and
  replayed with static buffers. RAM's image encoder and the text encoder are compiled as modules: their
  tags and prompts pass through the host between them, which a graph cannot hold.
* The graded path (the student's step with gradients, the VAE decode forward and backward, the
  discriminator's backbone) is compiled block by block (`compile_repeated_blocks`); AOTAutograd compiles
  each block's backward too, and activation checkpointing keeps working inside the blocks.

Modules are compiled in place, so their state-dict keys are unchanged: a checkpoint of an eager run
resumes compiled and the other way round (`method.speed` is not compared on resume). Every region
equals eager within float rounding (tests/test_training_speed.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from addsr_pl.inference.compile_cache import CompileCache, architecture_digest, cache_key, default_root
from addsr_pl.inference.speed import COMPILE_MODES, SamplerGraphs, apply_memory_format, apply_tf32
from addsr_pl.method.memory import compile_repeated_blocks

log = logging.getLogger(__name__)

AUTO = "auto"
# inductor: torch's compiler (the speed-up). aot_eager and eager trace the same graphs without generating
# code: what CPU tests use to check the traced regions in seconds.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
SWITCHES = ("channels_last", "tf32", "cuda_graph", "tagger_in_compute_dtype")


@dataclass(frozen=True)
class TrainingSpeed:
    """`method.speed` resolved for one device (`auto`: on for CUDA, off elsewhere; compile `auto`: mode
    default on CUDA, none elsewhere)."""

    channels_last: bool
    tf32: bool
    compile: str
    compile_backend: str
    cuda_graph: bool
    cuda_graph_warmup: int
    cuda_graph_cache: int
    tagger_in_compute_dtype: bool

    @classmethod
    def for_device(cls, speed: dict, device: torch.device) -> TrainingSpeed:
        cuda = device.type == "cuda"
        switches = {}
        for key in SWITCHES:
            value = speed[key]
            if value != AUTO and not isinstance(value, bool):
                raise ValueError(f"method.speed.{key} = {value!r}: must be auto, true or false")
            switches[key] = cuda if value == AUTO else value
        compile_mode = speed["compile"]
        if compile_mode == AUTO:
            compile_mode = "default" if cuda else "none"
        if compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"method.speed.compile = {compile_mode!r}: must be auto or one of {list(COMPILE_MODES)}"
            )
        if speed["compile_backend"] not in COMPILE_BACKENDS:
            raise ValueError(
                f"method.speed.compile_backend = {speed['compile_backend']!r}: must be one of "
                f"{list(COMPILE_BACKENDS)}"
            )
        for key in ("cuda_graph_warmup", "cuda_graph_cache"):
            if not isinstance(speed[key], int) or speed[key] < 1:
                raise ValueError(f"method.speed.{key} = {speed[key]!r}: must be an integer >= 1")
        return cls(
            switches["channels_last"],
            switches["tf32"],
            compile_mode,
            speed["compile_backend"],
            # torch.compile's reduce-overhead mode brings its own CUDA graphs
            switches["cuda_graph"] and cuda and compile_mode != "reduce-overhead",
            speed["cuda_graph_warmup"],
            speed["cuda_graph_cache"],
            switches["tagger_in_compute_dtype"],
        )

    @classmethod
    def eager(cls) -> TrainingSpeed:
        return cls(False, False, "none", "inductor", False, 1, 1, False)

    def compile_options(self) -> dict:
        """`torch.compile` arguments; a mode is inductor's only (the other backends take none)."""
        if self.compile_backend == "inductor":
            return {"mode": self.compile, "dynamic": False}
        return {"backend": self.compile_backend, "dynamic": False}

    def compiled(self, fn: Callable) -> Callable:
        return fn if self.compile == "none" else torch.compile(fn, **self.compile_options())


class FrozenRegion:
    """A no-grad function `fn(tensors, constants)` of the iteration, run eager, compiled, and on CUDA
    replayed from a CUDA graph per input signature (`SamplerGraphs`). It must draw no random numbers:
    the draws happen before it, and come in as tensors."""

    def __init__(self, fn: Callable[[list[Tensor | None], tuple], Tensor | tuple], speed: TrainingSpeed):
        self.run = speed.compiled(fn)
        self.graphs = (
            # the DataLoader's pin-memory thread may call CUDA during a capture
            SamplerGraphs(self.run, speed.cuda_graph_warmup, speed.cuda_graph_cache, "thread_local")
            if speed.cuda_graph
            else None
        )

    @torch.no_grad()
    def __call__(self, tensors: list[Tensor | None], constants: tuple[Hashable, ...] = ()) -> Tensor | tuple:
        if self.graphs is not None:
            return self.graphs(tensors, constants)
        return self.run(tensors, constants)


def frozen_modules(module) -> list[nn.Module]:
    """The modules of the frozen half that are compiled in place: RAM's image encoder and the SD2 text
    encoder (their outputs pass through the host, so they sit outside the regions)."""
    modules = []
    tagger = module.conditioner.tagger
    if tagger is not None and hasattr(tagger, "ram"):
        modules.append(tagger.ram.visual_encoder)
    text_encoder = getattr(module.conditioner.prompt_encoder, "text_encoder", None)
    if isinstance(text_encoder, nn.Module):
        modules.append(text_encoder)
    return modules


def graded_modules(module) -> list[nn.Module]:
    """Where the graded path's repeated blocks are: the student's networks and the VAE (its decoder runs
    forward and backward for the graded x0)."""
    return [*module.student.networks().values(), module.codec.vae]


def apply_training_speed(module, speed: TrainingSpeed, device: torch.device) -> int:
    """channels_last, TF32 and the compiled modules of `speed` on an AddSRModule, inductor's code kept in the
    run's compile cache entry; returns how many modules or blocks were compiled. The regions themselves are
    built by the module (`AddSRModule.use_speed`)."""
    if speed.channels_last:
        # the teacher's networks hold the student's frozen weights (shared), the VAE serves both halves
        convolutional = [*module.teacher.networks().values(), *module.student.networks().values()]
        apply_memory_format([*convolutional, module.codec.vae], True)
    apply_tf32(device, speed.tf32)
    if speed.compile == "none":
        return 0
    if speed.compile_backend == "inductor":
        cache = training_compile_cache(module, speed, device, module.method["speed"]["compile_cache"])
        cache.activate()
        log.info("method.speed: compiled graphs are kept in %s", cache.folder)
    options = speed.compile_options()
    compiled = 0
    for frozen in frozen_modules(module):
        frozen.compile(**options)
        compiled += 1
    for graded in graded_modules(module):
        compiled += compile_repeated_blocks(graded, **options)
    for block in getattr(module.discriminator.backbone, "blocks", []):
        block.compile(**options)
        compiled += 1
    return compiled


def training_compile_cache(
    module, speed: TrainingSpeed, device: torch.device, root: str | None
) -> CompileCache:
    """Where a training run keeps its compiled graphs: an entry of the compile cache that upscaling uses
    (inference/compile_cache.py; `root` null: $ADDSR_PL_COMPILE_CACHE, else ~/.cache/addsr-pl/compile), keyed
    by the architecture of every network of the iteration, the compute dtype, the device, torch and the
    compile settings. A restarted or requeued run loads its graphs instead of compiling them again."""
    networks = [module.student, module.teacher, module.codec, module.conditioner, module.discriminator]
    dtype = next(module.teacher.parameters()).dtype
    settings = {"compile": speed.compile, "compile_scope": "training", "channels_last": speed.channels_last}
    key = cache_key(architecture_digest("training", networks), dtype, device, settings)
    return CompileCache(root or default_root(), key, 0.0)
