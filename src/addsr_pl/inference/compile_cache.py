"""Compiled graphs kept on disk, so that `torch.compile` is paid once per machine, not once per process.

torch's own caches do the work: inductor's FX graph cache and AOTAutograd's cache (and Triton's kernels on
CUDA) are written under `TORCHINDUCTOR_CACHE_DIR`, and a later process that traces the same graphs loads
their compiled code instead of generating and building it again (dynamo still traces: seconds). torch
keys each graph by its code, shapes, dtypes, config and torch version; this module points that folder at
an entry of our own, one per

    model architecture (the manifest and every parameter's name, shape and dtype: graphs do not depend on
    weight values), dtype, compile mode and scope, channels_last, torch version and device
    (the GPU's name and compute capability, or the CPU's architecture),

so that entries of different models, GPUs or torch versions never mix and a stale one can be deleted
whole. Each entry's `graphs.json` records the input signatures (batch, size, steps, ...) compiled into
it and how long their first compile took: what lets the upscaler say "loaded compiled graphs" or
"compiling (first time on this machine, about N s)" before the first call of a signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

GRAPHS = "graphs.json"
INDUCTOR_DIR = "inductor"
# The counters torch keeps of its caches (torch._dynamo.utils.counters): graphs loaded vs compiled now.
# Inductor's alone: every compiled graph passes its FX graph cache once (AOTAutograd's cache, in front of
# it, counts the same graphs again).
HIT_COUNTERS = (("inductor", "fxgraph_cache_hit"),)
MISS_COUNTERS = (("inductor", "fxgraph_cache_miss"),)


def default_root() -> Path:
    """$XDG_CACHE_HOME/addsr-pl/compile, else ~/.cache/addsr-pl/compile."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "addsr-pl" / "compile"


def device_name(device: torch.device) -> str:
    """What compiled code depends on: the GPU's model and compute capability, or the CPU's architecture."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    return f"{device.type} {platform.machine()}"


def architecture_digest(manifest: str, modules: Iterable[nn.Module]) -> str:
    """sha256 of the student's manifest text, every parameter's and buffer's name, shape and dtype, and
    the config of each submodule that has a dict one (diffusers models: constants such as the VAE's
    scaling factor are baked into compiled code); private config keys (`_name_or_path`, versions) are
    left out, so a folder copied elsewhere keeps its entry."""
    digest = hashlib.sha256(manifest.encode())
    for index, module in enumerate(modules):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        for name, submodule in module.named_modules():
            config = getattr(submodule, "config", None)
            if isinstance(config, dict):
                public = {k: v for k, v in config.items() if not k.startswith("_")}
                digest.update(f"{index}.{name}:{json.dumps(public, sort_keys=True, default=str)}\n".encode())
    return digest.hexdigest()


def cache_key(model: str, dtype: torch.dtype, device: torch.device, speed: dict) -> dict:
    """The entry's key: model digest, dtype, device, torch version and the speed settings graphs depend on."""
    return {
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_name(device),
        "torch": torch.__version__,
        "compile": speed["compile"],
        "compile_scope": speed["compile_scope"],
        "channels_last": bool(speed["channels_last"]),
    }


def entry_name(key: dict) -> str:
    """The entry's folder name: short, readable where it can be, unique by a digest of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = f"{key['device'].split()[0]}-{key['dtype']}-{key['compile']}-{key['compile_scope']}"
    return f"{readable}-{digest}".replace("/", "_").replace(" ", "_")


@dataclass
class Notice:
    """What the upscaler says before a signature's first call: loaded, or compiling for about N s."""

    loaded: bool
    estimate_s: float

    def __str__(self) -> str:
        if self.loaded:
            return "loaded compiled graphs"
        return f"compiling (first time on this machine, about {round(self.estimate_s)} s)"


def counter_totals() -> tuple[int, int]:
    """(graphs loaded from torch's caches, graphs compiled) in this process so far."""
    from torch._dynamo.utils import counters

    def total(names) -> int:
        return sum(counters[group][name] for group, name in names)

    return total(HIT_COUNTERS), total(MISS_COUNTERS)


class CompileCache:
    """One entry of the compile cache (`root/<entry_name(key)>`), made torch's compile cache folder.

    Args:
        root: the cache folder (`compile_cache` of conf/upscale.yaml).
        key: `cache_key(...)`.
        estimate_s: the first compile's seconds to announce when none was recorded under `root` yet.
    """

    def __init__(self, root: str | Path, key: dict, estimate_s: float):
        self.root = Path(root).expanduser()
        self.key = key
        self.folder = self.root / entry_name(key)
        self.estimate_s = float(estimate_s)
        self._started: dict[str, tuple[float, tuple[int, int]]] = {}

    def activate(self) -> None:
        """Make this entry torch's compile cache folder for the rest of the process (before compiling)."""
        from torch._inductor.utils import clear_caches

        inductor = self.folder / INDUCTOR_DIR
        inductor.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        os.environ.pop("TRITON_CACHE_DIR", None)  # Triton's kernels follow, under the same folder
        clear_caches()  # paths torch derived from an earlier folder are forgotten

    def graphs(self) -> dict:
        """signature -> {"seconds": first compile} of what this entry holds."""
        return _read(self.folder / GRAPHS)

    def estimate(self) -> float:
        """A first compile's seconds: the longest recorded on this machine for this device, else the setting."""
        recorded = [
            record["seconds"]
            for entry in self.root.glob(f"*/{GRAPHS}")
            if self._same_device(entry.parent)
            for record in _read(entry).values()
            if record.get("seconds")
        ]
        return max(recorded) if recorded else self.estimate_s

    def _same_device(self, folder: Path) -> bool:
        key = _read(folder / "key.json")
        return key.get("device") == self.key["device"] and key.get("compile") == self.key["compile"]

    def before(self, signature: Hashable) -> Notice:
        """Call before a compiled call; returns what to tell the user about it."""
        name = json.dumps(signature, default=str)
        self._started[name] = (time.perf_counter(), counter_totals())
        return Notice(loaded=name in self.graphs(), estimate_s=self.estimate())

    def after(self, signature: Hashable) -> tuple[float, int, int]:
        """Call after that call: records the signature (and its seconds, when compiled now); returns
        (seconds, graphs loaded from the cache, graphs compiled) of the call."""
        name = json.dumps(signature, default=str)
        start, (hits, misses) = self._started.pop(name)
        seconds = time.perf_counter() - start
        now_hits, now_misses = counter_totals()
        loaded, compiled = now_hits - hits, now_misses - misses
        graphs = self.graphs()
        if name not in graphs or compiled:
            # seconds of a compile; null where every graph came from the cache (a signature that shares
            # the graphs of another, e.g. the per-module graphs at another step count)
            graphs[name] = {"seconds": round(seconds, 1) if compiled else None}
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.folder / f"{GRAPHS}.{os.getpid()}"
            partial.write_text(json.dumps(graphs, indent=2, sort_keys=True) + "\n")
            partial.replace(self.folder / GRAPHS)  # atomic: two processes never leave half a file
        return seconds, loaded, compiled


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
