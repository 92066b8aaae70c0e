"""What the UNet and ControlNet are conditioned on besides the noisy latent and the control image.

Text embeddings feed the (frozen) text cross-attention; the representation feeds SeeSR's image
cross-attention (`image_attentions`). Plain SD2 models take no representation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Cross-attention inputs of one batch: `text_embeds` [B, L, D] and `image_embeds` [B, N, D'] or None."""

    text_embeds: Tensor
    image_embeds: Tensor | None = None

    def repeat(self, n: int) -> Conditioning:
        """Each sample repeated n times along the batch (sample-major), as for several teacher timesteps."""
        image = None if self.image_embeds is None else self.image_embeds.repeat_interleave(n, dim=0)
        return Conditioning(self.text_embeds.repeat_interleave(n, dim=0), image)

    def to(self, dtype: torch.dtype) -> Conditioning:
        image = None if self.image_embeds is None else self.image_embeds.to(dtype)
        return Conditioning(self.text_embeds.to(dtype), image)


# images in [0, 1] -> representation [B, N, D'] (or None for models without image cross-attention)
Representer = Callable[[Tensor], Tensor | None]


def no_representation(images: Tensor) -> None:
    """The representer of plain SD2 models: they have no image cross-attention."""
    return None
