"""The paper's image-quality metrics through pyiqa, from local weight files only.

Full-reference: PSNR and SSIM on the Y channel of YCbCr (BT.601, as BasicSR and MATLAB; pyiqa's own
default would be YIQ) with `crop_border = scale`, LPIPS (AlexNet, v0.1), DISTS. pyiqa's SSIM rounds Y
to 8-bit levels first, as MATLAB does; BasicSR's `calculate_ssim` does not, and gives values up to
about 1.4e-3 higher. No-reference: NIQE
(also cropped by the scale), MUSIQ (KonIQ), MANIQA (the PIPAL checkpoint, as SeeSR and OSEDiff
report) and CLIPIQA.

Weights are never downloaded. `weights_dir` is laid out like a torch hub folder, which is where pyiqa
and torchvision put them when they are allowed to download (default: `torch.hub.get_dir()`, i.e.
`$TORCH_HOME/hub`): pyiqa's checkpoints in `pyiqa/`, torchvision's backbones in `checkpoints/`,
OpenAI CLIP in `clip/`. Copying `$TORCH_HOME/hub` from a machine where pyiqa ran online is enough.
MANIQA's ViT is built by timm with pretrained weights from the Hugging Face cache before pyiqa
overwrites them with the MANIQA checkpoint, so that file must be in the Hugging Face cache as well.
Every file is checked before a metric is built; a missing one raises `MissingWeightsError` naming
the file, the path it was looked for at and how to get it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

_PYIQA_WEIGHTS = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"


class MissingWeightsError(FileNotFoundError):
    """A weight file a metric needs is not on disk (nothing is downloaded)."""


@dataclass(frozen=True)
class WeightFile:
    """A file under `weights_dir` (`relative`), where it comes from, and its SHA-256 where the loader
    checks it (a file with another hash would be downloaded again, so it is refused instead)."""

    relative: str
    source: str
    sha256: str | None = None


@dataclass(frozen=True)
class HubFile:
    """A file a library reads from the Hugging Face cache."""

    repo_id: str
    filenames: tuple[str, ...]  # any one of them


@dataclass(frozen=True)
class MetricSpec:
    """How one metric of the suite is built with pyiqa 0.1.16 and which files that reads.

    checkpoint: loaded only with pretrained weights; passed as `pretrained_model_path` unless
        `load_after` (loaded with pyiqa's `load_pretrained_network(strict=strict)` after building, for
        architectures whose `pretrained_model_path` expects another file layout than the released one).
    backbones: read while building, whatever `pretrained` says (pyiqa hard-codes them).
    """

    pyiqa_name: str
    label: str
    full_reference: bool
    lower_is_better: bool
    crop_border: bool = False
    options: dict = field(default_factory=dict)
    checkpoint: WeightFile | None = None
    load_after: bool = False
    strict: bool = True
    backbones: tuple[WeightFile, ...] = ()
    hub_backbones: tuple[HubFile, ...] = ()
    # pyiqa's `pretrained` flag: the value meaning "no checkpoint", or None where it has none
    no_pretrained_value: object = False


def _pyiqa_file(name: str) -> WeightFile:
    return WeightFile(f"pyiqa/{name}", f"{_PYIQA_WEIGHTS}/{name}")


_Y_CHANNEL = {"test_y_channel": True, "color_space": "ycbcr"}

METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec(
        "psnr", "PSNR", True, False, crop_border=True, options=_Y_CHANNEL, no_pretrained_value=None
    ),
    "ssim": MetricSpec(
        "ssim", "SSIM", True, False, crop_border=True, options=_Y_CHANNEL, no_pretrained_value=None
    ),
    "lpips": MetricSpec(
        "lpips",
        "LPIPS",
        True,
        True,
        checkpoint=_pyiqa_file("LPIPS_v0.1_alex-df73285e.pth"),
        backbones=(
            WeightFile(
                "checkpoints/alexnet-owt-7be5be79.pth",
                "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            ),
        ),
    ),
    "dists": MetricSpec(
        "dists",
        "DISTS",
        True,
        True,
        checkpoint=_pyiqa_file("DISTS_weights-f5e65c96.pth"),
        backbones=(
            WeightFile(
                "checkpoints/vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"
            ),
        ),
    ),
    "niqe": MetricSpec(
        "niqe",
        "NIQE",
        False,
        True,
        crop_border=True,
        checkpoint=_pyiqa_file("niqe_modelparameters.mat"),
        no_pretrained_value=None,
    ),
    "musiq": MetricSpec(
        "musiq", "MUSIQ", False, False, checkpoint=_pyiqa_file("musiq_koniq_ckpt-e95806b9.pth")
    ),
    "maniqa": MetricSpec(
        "maniqa-pipal",
        "MANIQA",
        False,
        False,
        checkpoint=_pyiqa_file("MANIQA_PIPAL-ae6d356b.pth"),
        load_after=True,
        hub_backbones=(
            HubFile(
                "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k", ("model.safetensors", "pytorch_model.bin")
            ),
        ),
    ),
    "clipiqa": MetricSpec(
        "clipiqa",
        "CLIPIQA",
        False,
        False,
        backbones=(
            WeightFile(
                "clip/RN50.pt",
                "https://openaipublic.azureedge.net/clip/models/"
                "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
                sha256="afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
            ),
        ),
    ),
}


def default_weights_dir() -> Path:
    """`$TORCH_HOME/hub` (pyiqa keeps its checkpoints in its `pyiqa/` subfolder)."""
    return Path(torch.hub.get_dir())


def required_files(name: str, weights_dir: str | Path, pretrained: bool = True) -> list[Path]:
    """The local files metric `name` reads, checked; raises `MissingWeightsError` for the first missing."""
    spec = _spec(name)
    weights_dir = Path(weights_dir)
    files = [
        *spec.backbones,
        *([spec.checkpoint] if spec.checkpoint and _reads_checkpoint(spec, pretrained) else []),
    ]
    paths = []
    for weight in files:
        path = weights_dir / weight.relative
        if not path.is_file():
            raise MissingWeightsError(
                f"Metric {name} needs {path.name}, expected at {path}. Download {weight.source} on a "
                f"machine with internet and place it there (weights_dir={weights_dir} is laid out like "
                "$TORCH_HOME/hub: pyiqa/, checkpoints/, clip/)."
            )
        if weight.sha256 is not None and _sha256(path) != weight.sha256:
            raise MissingWeightsError(
                f"{path} does not have the SHA-256 {weight.sha256} the loader checks (it would download it "
                f"again); replace it with {weight.source}"
            )
        paths.append(path)
    for hub in spec.hub_backbones:
        paths.append(_hub_file(name, hub))
    return paths


def check_weights(names: Sequence[str], weights_dir: str | Path, pretrained: bool = True) -> None:
    """Every file the metrics `names` read; one `MissingWeightsError` listing all that are missing, each
    with where it comes from, and the metrics that run without any file."""
    problems = []
    for name in names:
        try:
            required_files(name, weights_dir, pretrained)
        except MissingWeightsError as error:
            problems.append(f"- {error}")
    if problems:
        free = [n for n, spec in METRICS.items() if not spec.backbones and spec.checkpoint is None
                and not spec.hub_backbones]  # fmt: skip
        raise MissingWeightsError(
            f"{len(problems)} of metrics.names={list(names)} cannot be built from {weights_dir}:\n"
            + "\n".join(problems)
            + f"\nPlace the files as named above (metrics.weights_dir), or score without them: "
            f"metrics.names=[{','.join(free)}] needs no weight file."
        )


def _reads_checkpoint(spec: MetricSpec, pretrained: bool) -> bool:
    """Metrics pyiqa cannot build without their file (NIQE's model parameters) always read it."""
    return pretrained or spec.no_pretrained_value is None


def _hub_file(name: str, hub: HubFile) -> Path:
    from huggingface_hub import try_to_load_from_cache

    for filename in hub.filenames:
        cached = try_to_load_from_cache(hub.repo_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    from huggingface_hub.constants import HF_HUB_CACHE

    raise MissingWeightsError(
        f"Metric {name} builds its backbone from {hub.repo_id}/{hub.filenames[0]}, which is not in the "
        f"Hugging Face cache {HF_HUB_CACHE}. On a machine with internet run `hf download {hub.repo_id} "
        f"{hub.filenames[0]}` and copy the cache folder here (or point HF_HUB_CACHE at it)."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _spec(name: str) -> MetricSpec:
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return METRICS[name]


def create_metric(
    name: str,
    *,
    scale: int,
    weights_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    pretrained: bool = True,
) -> torch.nn.Module:
    """Build metric `name` (a key of `METRICS`) from local files.

    `scale` is the SR factor, the border cropped for PSNR, SSIM and NIQE. `pretrained=False` builds
    the network with random weights where pyiqa allows it (MUSIQ, MANIQA's head): only for checking
    the plumbing, the scores mean nothing.
    """
    import pyiqa

    spec = _spec(name)
    weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    required_files(name, weights_dir, pretrained)
    options = dict(spec.options)
    if spec.crop_border:
        options["crop_border"] = scale
    checkpoint = weights_dir / spec.checkpoint.relative if spec.checkpoint is not None else None
    if spec.no_pretrained_value is not None and (spec.load_after or not pretrained):
        options["pretrained"] = spec.no_pretrained_value
    reads_checkpoint = checkpoint is not None and _reads_checkpoint(spec, pretrained)
    if reads_checkpoint and not spec.load_after:
        options["pretrained_model_path"] = str(checkpoint)
    if spec.pyiqa_name.startswith("clipiqa"):
        _import_openai_clip()
    with _torch_hub_dir(weights_dir):
        metric = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **options)
    if reads_checkpoint and spec.load_after:
        from pyiqa.archs.arch_util import load_pretrained_network

        load_pretrained_network(metric.net, str(checkpoint), spec.strict)
    return metric.eval()


@contextmanager
def _torch_hub_dir(path: Path) -> Iterator[None]:
    """torchvision and pyiqa's CLIP loader read `torch.hub.get_dir()`; point it at the weights folder."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def _import_openai_clip() -> None:
    """Import OpenAI's `clip` package, which pyiqa's CLIPIQA uses.

    `clip` reads `packaging` through `from pkg_resources import packaging`; setuptools >= 81 no longer
    ships `pkg_resources`. Where it is missing, a module offering just that name (the standalone
    `packaging` it re-exported) stands in while `clip` is imported and is removed right after, so no
    other package ever sees it.
    """
    if "clip" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    import packaging.version

    stand_in = types.ModuleType("pkg_resources")
    stand_in.packaging = packaging
    sys.modules["pkg_resources"] = stand_in
    try:
        importlib.import_module("clip")
    except ImportError as error:
        raise ImportError(
            "CLIPIQA needs OpenAI's `clip` package (pip install openai-clip); if it still fails to "
            f"import, install setuptools<81 for pkg_resources: {error}"
        ) from error
    finally:
        del sys.modules["pkg_resources"]


class MetricSuite:
    """Several metrics at once: `suite(sr, hr)` -> {name: scores [B] on the CPU}.

    Args:
        names: keys of `METRICS` ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa").
        scale: the SR factor (border crop of PSNR, SSIM, NIQE).
        weights_dir: torch-hub-style folder of weights; None is `$TORCH_HOME/hub`.
        device: where the metric networks run.
        pretrained: False builds random networks where pyiqa allows it (plumbing checks only).

    Full-reference metrics are skipped, not errors, when `hr` is None.
    """

    def __init__(
        self,
        names: Sequence[str],
        scale: int,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        pretrained: bool = True,
    ):
        self.names = list(names)
        for name in self.names:
            _spec(name)
        check_weights(
            self.names, weights_dir if weights_dir is not None else default_weights_dir(), pretrained
        )
        self.device = torch.device(device)
        self.metrics = {
            name: create_metric(
                name, scale=scale, weights_dir=weights_dir, device=device, pretrained=pretrained
            )
            for name in self.names
        }

    @property
    def lower_is_better(self) -> dict[str, bool]:
        return {name: METRICS[name].lower_is_better for name in self.names}

    @property
    def full_reference(self) -> dict[str, bool]:
        return {name: METRICS[name].full_reference for name in self.names}

    @torch.no_grad()
    def __call__(self, sr: Tensor, hr: Tensor | None = None) -> dict[str, Tensor]:
        """Scores of `sr` [B, 3, H, W] in [0, 1] (clamped, as when saved), against `hr` where given."""
        if sr.ndim != 4 or sr.shape[1] != 3:
            raise ValueError(f"MetricSuite expects sr shaped [B, 3, H, W], got {tuple(sr.shape)}")
        if hr is not None and hr.shape != sr.shape:
            raise ValueError(f"sr {tuple(sr.shape)} and hr {tuple(hr.shape)} must have the same shape")
        sr = sr.float().clamp(0, 1).to(self.device)
        hr = hr.float().clamp(0, 1).to(self.device) if hr is not None else None
        scores = {}
        for name, metric in self.metrics.items():
            if METRICS[name].full_reference:
                if hr is None:
                    continue
                value = metric(sr, hr)
            else:
                value = metric(sr)
            scores[name] = value.reshape(sr.shape[0]).float().cpu()
        return scores
