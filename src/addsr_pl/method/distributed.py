"""DDP for AddSR: the student's and the discriminator's trained weights synchronised apart.

Lightning's DDP wraps the whole LightningModule in one `DistributedDataParallel`. AddSR's iteration has
two backwards, the generator's (student gradients) and the discriminator's (head gradients), so each
leaves the other's trained weights without a gradient, which one wrapper can only handle by searching
the autograd graph for unused parameters after every forward (`find_unused_parameters=True`).
`PartsDDPStrategy` instead lets a module that has `wrap_for_ddp` wrap its trained parts itself, one
`DistributedDataParallel` each: every backward then reduces exactly its own part's gradients, with no
search. Modules without it (the teacher and PSR-decoder stages) are wrapped whole, as Lightning does.

Each wrapper's all-reduce goes through `counted_allreduce`, which adds the bytes it sends to
`CommunicationCount` (the iteration's count is logged as `train/allreduce_mib`).
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel


@dataclass
class CommunicationCount:
    """Bytes all-reduced by the wrappers of one module since the count was last taken."""

    bytes: int = 0

    def take(self) -> int:
        taken, self.bytes = self.bytes, 0
        return taken


def counted_allreduce(
    count: CommunicationCount, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (sum, then divide by the world size), counting the bucket's bytes."""
    buffer = bucket.buffer()
    count.bytes += buffer.numel() * buffer.element_size()
    return allreduce_hook(None, bucket)


@dataclass
class SyncedParts:
    """The DDP wrapper of each trained part, by the part's id, and what they all-reduced."""

    wrappers: dict[int, DistributedDataParallel] = field(default_factory=dict)
    count: CommunicationCount = field(default_factory=CommunicationCount)

    def wrap(self, part: nn.Module, **ddp_kwargs) -> None:
        # (no `from __future__ import annotations` in this file: DDP checks the hook's annotations as types)
        wrapper = DistributedDataParallel(part, **ddp_kwargs)
        wrapper.register_comm_hook(self.count, counted_allreduce)
        self.wrappers[id(part)] = wrapper

    def get(self, part: nn.Module) -> nn.Module:
        """The part's wrapper, or the part where it has none (one process)."""
        return self.wrappers.get(id(part), part)

    def sync_gradients(self, enabled: bool) -> None:
        """Whether the next backwards all-reduce (`no_sync` for the micro-steps before an optimizer step)."""
        for wrapper in self.wrappers.values():
            wrapper.require_backward_grad_sync = enabled


class PartsDDPStrategy(DDPStrategy):
    """`DDPStrategy` that leaves the wrapping to a LightningModule with `wrap_for_ddp(**ddp_kwargs)`.

    Args (besides DDPStrategy's): `whole_module_find_unused_parameters`: `find_unused_parameters` for
    modules wrapped whole (their stages may train weights that some iterations leave unused); the strategy's
    own `find_unused_parameters` and other DDP arguments (`bucket_cap_mb`, ...) go to the parts' wrappers.
    """

    def __init__(self, *args, whole_module_find_unused_parameters: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.whole_module_find_unused_parameters = whole_module_find_unused_parameters

    def configure_ddp(self) -> None:
        module = self.lightning_module
        if not hasattr(module, "wrap_for_ddp"):
            self._ddp_kwargs = {
                **self._ddp_kwargs,
                "find_unused_parameters": self.whole_module_find_unused_parameters,
            }
            super().configure_ddp()
            return
        module.wrap_for_ddp(device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)
