"""Exponential moving average of the trainable student weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

EMA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EMA_PLACEMENTS = ("device", "cpu")


class EMA(nn.Module):
    """Shadow copies of named parameters, kept as buffers so they are checkpointed.

    Args:
        named_params: the trained parameters to follow.
        decay: shadow <- decay * shadow + (1 - decay) * weight after every optimiser step.
        placement: `device` keeps the shadows with the model (they move with it); `cpu` keeps them in
            host memory whatever device the model moves to (each update copies the weights to the host).
        dtype: `float32` or `bfloat16` shadows; the dtype is fixed here and survives `module.to(dtype)`.

    One update is a single `torch._foreach_lerp_` over all shadows, not one kernel per parameter.
    """

    def __init__(
        self,
        named_params: dict[str, nn.Parameter],
        decay: float,
        placement: str = "device",
        dtype: str = "float32",
    ):
        super().__init__()
        if placement not in EMA_PLACEMENTS:
            raise ValueError(f"method.memory.ema_placement = {placement!r}: must be one of {EMA_PLACEMENTS}")
        if dtype not in EMA_DTYPES:
            raise ValueError(f"method.memory.ema_dtype = {dtype!r}: must be one of {tuple(EMA_DTYPES)}")
        self.decay = decay
        self.placement = placement
        self.dtype = EMA_DTYPES[dtype]
        self._params = named_params
        self._names = {name: name.replace(".", "__") for name in named_params}
        for name, p in named_params.items():
            shadow = p.detach().to(self.dtype, copy=True)
            on_host = placement == "cpu" and not shadow.is_meta  # a module planned on meta stays there
            self.register_buffer(self._names[name], shadow.cpu() if on_host else shadow)

    def _apply(self, fn, recurse: bool = True):
        """Follow the model's device moves (unless placed on the CPU) but never its dtype casts."""
        if self.placement == "cpu":
            return self
        for key, buffer in self._buffers.items():
            if buffer is not None:
                device = fn(torch.empty(0, device=buffer.device, dtype=buffer.dtype)).device
                self._buffers[key] = buffer.to(device)
        return self

    def shadow(self, name: str) -> torch.Tensor:
        return getattr(self, self._names[name])

    @torch.no_grad()
    def update(self) -> None:
        names = list(self._params)
        shadows = [self.shadow(name) for name in names]
        weights = [self._params[name].detach().to(s.device, s.dtype) for name, s in zip(names, shadows)]
        if shadows:
            torch._foreach_lerp_(shadows, weights, 1 - self.decay)

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
