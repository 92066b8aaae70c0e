"""Exponential moving average of the trainable student weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies of named parameters, kept as buffers so they move with the module and are checkpointed."""

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float):
        super().__init__()
        self.decay = decay
        self._params = named_params
        self._names = {name: name.replace(".", "__") for name in named_params}
        for name, p in named_params.items():
            self.register_buffer(self._names[name], p.detach().clone().float())

    def shadow(self, name: str) -> torch.Tensor:
        return getattr(self, self._names[name])

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self._params.items():
            self.shadow(name).lerp_(p.detach().float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights; the trained weights come back on exit."""
        saved = {name: p.detach().clone() for name, p in self._params.items()}
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(self.shadow(name))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._params.items():
                    p.copy_(saved[name])
