"""Speed settings shared by every caller of the sampler (upscale, evaluate, validation, bench), and the
whole-sampler CUDA graphs.

`SpeedSettings` holds precision, channels_last, TF32, the `torch.compile` mode and whether the whole
sampler runs as a CUDA graph. `SamplerGraphs` captures one CUDA graph per input signature (step
timesteps, PSR weight, image size, batch, dtype) with static input buffers, and replays it for every
later image or tile of that signature; outputs are cloned out of the graph's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# auto: bf16 on CUDA (no fp16 overflow in the VAE, Hopper's fast path), fp32 elsewhere.
PRECISION_CHOICES = ("auto", *PRECISIONS)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("modules", "sampler")


@dataclass(frozen=True)
class SpeedSettings:
    """How the sampler runs; see the speed keys of `conf/upscale.yaml`.

    Args:
        precision: auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on the CPU).
        channels_last: UNet, ControlNet and VAE weights in channels_last memory format.
        tf32: TF32 matmuls and convolutions for what stays in fp32 (CUDA).
        compile: none | default | reduce-overhead | max-autotune-no-cudagraphs: the `torch.compile` mode.
        compile_scope: modules (the denoiser, the VAE encoder and decoder, the tagger's image encoder and
            the small decoder, each compiled once and reused by every step count) | sampler (the whole
            sampler as one graph per input signature: more fusion, one compilation per step count).
        cuda_graph: capture the whole sampler as a CUDA graph per input signature and replay it
            (CUDA only; with compile=reduce-overhead torch.compile's own graphs are used instead).
        cuda_graph_warmup: eager runs on a side stream before a capture (lazy initialisations).
        cuda_graph_cache: graphs kept at most (least recently used dropped first).
    """

    precision: str
    channels_last: bool
    tf32: bool
    compile: str
    compile_scope: str
    cuda_graph: bool
    cuda_graph_warmup: int
    cuda_graph_cache: int

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision = {self.precision!r}: must be one of {list(PRECISION_CHOICES)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(
                f"compile = {self.compile!r}: must be one of {list(COMPILE_MODES)} "
                "(max-autotune with CUDA graphs is reduce-overhead's job plus minutes of tuning: not offered)"
            )
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope = {self.compile_scope!r}: must be one of {list(COMPILE_SCOPES)}")
        if self.cuda_graph_warmup < 1 or self.cuda_graph_cache < 1:
            raise ValueError(
                f"cuda_graph_warmup = {self.cuda_graph_warmup}, cuda_graph_cache = {self.cuda_graph_cache}: "
                "both must be >= 1"
            )

    @classmethod
    def from_dict(cls, values: dict) -> SpeedSettings:
        """From a settings dict that holds every speed key (others are ignored)."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if values.get(n) is None]
        if missing:
            raise ValueError(f"speed settings lack {missing}: set them in conf/upscale.yaml or the student")
        return cls(**{n: values[n] for n in names})

    def as_dict(self) -> dict:
        return asdict(self)

    def dtype(self, device: torch.device) -> torch.dtype:
        if self.precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return PRECISIONS[self.precision]

    def graphs_on(self, device: torch.device) -> bool:
        """Whether our own whole-sampler CUDA graphs run on this device."""
        return self.cuda_graph and device.type == "cuda" and self.compile != "reduce-overhead"


def exported_defaults() -> dict:
    """The speed defaults an export writes (`inference_speed` of conf/method/addsr.yaml): the fallback
    for students exported before the manifest carried them."""
    from omegaconf import OmegaConf

    from addsr_pl.paths import config_dir

    method = OmegaConf.load(config_dir() / "method" / "addsr.yaml")
    return OmegaConf.to_container(method.inference_speed, resolve=True)


def speed_settings(settings: dict, student_defaults: dict | None) -> SpeedSettings:
    """Upscale settings (`conf/upscale.yaml` plus flags) over the exported student's defaults: a key set
    to null in the former takes the student's value (`exported_defaults()` for a student without)."""
    defaults = student_defaults if student_defaults is not None else exported_defaults()
    names = [f.name for f in fields(SpeedSettings)]
    merged = {n: defaults.get(n) if settings.get(n) is None else settings[n] for n in names}
    return SpeedSettings.from_dict(merged)


def apply_memory_format(modules: list[nn.Module], channels_last: bool) -> None:
    """channels_last (or back to contiguous) for the convolution-heavy modules."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules:
        module.to(memory_format=fmt)


def apply_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (a process-wide switch)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def signature(tensors: list[Tensor | None], constants: tuple[Hashable, ...]) -> tuple:
    """A graph's cache key: each input's shape, dtype and device (None stays None) plus the constants
    baked into the graph (timesteps, PSR weight)."""
    shapes = tuple(None if t is None else (tuple(t.shape), t.dtype, str(t.device)) for t in tensors)
    return (shapes, constants)


class SamplerGraphs:
    """CUDA graphs of one function `fn(tensors, constants) -> Tensor` (or a tuple of tensors), one per
    `signature`.

    The first call with a new signature copies its inputs into static buffers, runs `fn` `warmup`
    times on a side stream, captures it into a graph (all graphs share one memory pool, which is safe
    because each replay's output is cloned before the next) and replays it; later calls copy their
    inputs into the buffers and replay. `None` inputs stay None. Under autocast (training), warm-up and
    capture run with autocast's cast cache off: a cached cast would live in the graph's memory after
    autocast freed it. `capture_error_mode` is `torch.cuda.graph`'s: `thread_local` lets other threads (a
    training DataLoader's pin-memory thread) go on calling CUDA while this one captures.
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor | None], tuple], Tensor | tuple],
        warmup: int,
        max_graphs: int,
        capture_error_mode: str = "global",
    ):
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor | None], Tensor]] = (
            OrderedDict()
        )
        self.captures = 0
        self.capture_error_mode = capture_error_mode
        self._pool = None

    def __call__(self, tensors: list[Tensor | None], constants: tuple[Hashable, ...]) -> Tensor:
        key = signature(tensors, constants)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(tensors, constants)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_inputs, static_output = entry
        for buffer, value in zip(static_inputs, tensors):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        if isinstance(static_output, tuple):
            return tuple(None if t is None else t.clone() for t in static_output)
        return static_output.clone()

    def _capture(self, tensors: list[Tensor | None], constants: tuple):
        static_inputs = [None if t is None else t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), uncached_autocast():
            for _ in range(self.warmup):
                self.fn(static_inputs, constants)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with (
            torch.cuda.graph(graph, pool=self._pool, capture_error_mode=self.capture_error_mode),
            uncached_autocast(),
        ):
            static_output = self.fn(static_inputs, constants)
        self.captures += 1
        return graph, static_inputs, static_output


def uncached_autocast():
    """CUDA autocast as it is now (on or off, its dtype) with its cast cache off."""
    return torch.autocast(
        "cuda",
        dtype=torch.get_autocast_dtype("cuda"),
        enabled=torch.is_autocast_enabled("cuda"),
        cache_enabled=False,
    )
