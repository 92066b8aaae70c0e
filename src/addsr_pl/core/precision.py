"""Autocast switched off around code that must run in its weights' dtype."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast_off(device_type: str):
    """Autocast off for `device_type`; nothing to switch off where autocast does not exist (the meta device
    of FLOP counts and memory plans)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()
