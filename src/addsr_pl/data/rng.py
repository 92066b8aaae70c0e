"""Seeds derived from tuples of integers, so every random draw has a reproducible address."""

from __future__ import annotations

import numpy as np
import torch


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integers (e.g. seed, rank, batch counter).

    NumPy's `SeedSequence` hashes the whole tuple, so neighbouring tuples give unrelated streams.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)
