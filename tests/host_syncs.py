"""Counting, on the CPU, what would make the host wait for the GPU.

On the CPU every tensor is a host tensor, so a sync cannot be seen by device. `DeviceSyncCounter` tracks
provenance instead: a tensor is a *device tensor* when it is one of the given tensors (the modules'
parameters and buffers, the optimizer states, the batch) or computed from one. Reading a device tensor's values on the host (`.item()`, `bool()`, `int()`, `float()`,
`.tolist()`, `.cpu()`, `.numpy()`), an op whose output shape depends on its values (`nonzero`,
`masked_select`, boolean indexing, ...) or a blocking copy of a host tensor to the device (`.to(device)`
without `non_blocking=True`, `torch.tensor(..., device=...)`: torch waits for the stream after such a copy
from pageable memory) counts as one sync, as it would be one on CUDA. What a factory op
makes is a device tensor when the call names a `device` (`torch.tensor(..., device=module.device)`), else a
host tensor (a CPU generator's draws) until it meets a device tensor.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# ops that read values on the host or size their output by the values
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
HOST_READS = ("tolist", "cpu", "numpy")
# factories whose result is a device tensor when they are given a `device`; the first two copy host data
# (on CUDA a blocking copy from pageable memory waits for the stream: torch syncs after it)
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "arange")
UPLOADING_FACTORIES = ("tensor", "as_tensor")


class DeviceSyncCounter(TorchDispatchMode):
    """Within `with DeviceSyncCounter(device_tensors) as counter:`, `counter.syncs` lists (what, where)
    for every host read of a device tensor."""

    def __init__(self, device_tensors: Iterable[torch.Tensor]):
        super().__init__()
        self.device = WeakIdKeyDictionary()
        for t in device_tensors:
            self.mark(t)
        self.syncs: list[tuple[str, str]] = []
        self._saved, self._saved_factories = {}, {}

    def mark(self, t: torch.Tensor) -> None:
        self.device[t] = True

    def is_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.device

    def record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        ours = [f for f in stack if "addsr_pl" in f.filename]
        # ours where any frame is; else the innermost frame outside torch (e.g. Lightning's)
        frames = ours or [f for f in stack if "/torch/" not in f.filename and "host_syncs" not in f.filename]
        where = f"{frames[-1].filename.split('site-packages/')[-1].split('src/')[-1]}:{frames[-1].lineno}"
        self.syncs.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        tainted = any(self.is_device(t) for t in inputs)
        if tainted and func in SYNC_OPS:
            self.record(str(func.overloadpacket.__name__))
        out = func(*args, **kwargs)
        if tainted:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out

    def __enter__(self):
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def read(t, *a, _name=name, _original=original, **k):
                if not self.is_device(t):
                    return _original(t, *a, **k)
                self.record(_name)
                with _disable_current_modes():
                    out = _original(t, *a, **k)
                    # what came to the host is a host tensor (on the CPU `.cpu()` returns the tensor itself)
                    return out.clone() if out is t else out

            setattr(torch.Tensor, name, read)
        original_to = torch.Tensor.to
        self._saved["to"] = original_to

        def to(t, *a, **k):
            out = original_to(t, *a, **k)
            device = k.get("device", next((x for x in a if isinstance(x, (str, torch.device))), None))
            if device is not None and torch.device(device).type != "cpu" or self.is_device(t):
                return out  # a real device, or already a device tensor: dispatch sees it
            if device is not None and not self.is_device(t):
                # host to "the device": blocking unless non_blocking=True
                if not k.get("non_blocking", False):
                    self.record("upload")
                if out is t:  # on the CPU `.to(cpu)` returns the tensor itself
                    with _disable_current_modes():
                        out = t.clone()
                self.mark(out)
            return out

        torch.Tensor.to = to
        for name in FACTORIES:
            original = getattr(torch, name)
            self._saved_factories[name] = original

            def make(*a, _name=name, _original=original, **k):
                out = _original(*a, **k)
                if k.get("device") is not None:
                    if _name in UPLOADING_FACTORIES:
                        self.record("upload")
                    self.mark(out)
                return out

            setattr(torch, name, make)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        for name, original in self._saved_factories.items():
            setattr(torch, name, original)
        return super().__exit__(*exc)
