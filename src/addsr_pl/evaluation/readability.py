"""Readability of rendered text: the share of characters a small glyph classifier reads correctly.

PSNR and SSIM reward the blurry conditional mean of an uncertain restoration, which is exactly what a
truncated diffusion sampler gives; they cannot tell it from the sharp, faithful result few-step
distillation is meant to give. On rendered pages (`addsr_pl.data.documents`) every character and its box
is known, so a classifier trained on the sharp glyphs of the training pages can read a restored page the
way a person would: a smeared, broken or invented letter is misread. It needs no downloaded weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from addsr_pl.data.documents import Glyph


def glyph_crops(images: Tensor, boxes: Tensor, image_index: Tensor, size: int) -> Tensor:
    """Square grey-level crops (K, 1, size, size) around `boxes` (K, 4: left, top, right, bottom, pixels)
    of `images[image_index]` ((B, 3, H, W) in [0, 1]), each normalised to zero mean and unit contrast, so
    that ink colour, background and colour casts do not matter."""
    grey = images.float().mean(1, keepdim=True)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) / 2 + 1
    rois = torch.cat([image_index[:, None].float(), centre - half, centre + half], 1)
    crops = roi_align(grey, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flat = crops.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-3)
    return flat.view_as(crops)


class GlyphClassifier(nn.Module):
    """A small CNN from a normalised glyph crop to one of `classes` characters."""

    def __init__(self, classes: str, size: int, width: int):
        super().__init__()
        self.classes = classes
        self.size = size
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(16 * width, len(classes)),
        )  # fmt: skip

    def forward(self, crops: Tensor) -> Tensor:
        return self.net(crops)

    def labels(self, glyphs: Sequence[Glyph]) -> Tensor:
        return torch.tensor([self.classes.index(g.char) for g in glyphs])


@dataclass(frozen=True)
class GlyphSet:
    """The glyphs of one image that lie wholly inside it, as boxes (n, 4) and their characters."""

    glyphs: tuple[Glyph, ...]

    @classmethod
    def inside(cls, glyphs: Sequence[Glyph], offset: tuple[int, int], height: int, width: int) -> GlyphSet:
        """The glyphs of a page seen through a crop whose top-left corner is the page's `offset` (left, top)."""
        left, top = offset
        kept = []
        for g in glyphs:
            box = (g.box[0] - left, g.box[1] - top, g.box[2] - left, g.box[3] - top)
            if box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height:
                kept.append(Glyph(g.char, box))
        return cls(tuple(kept))

    @property
    def boxes(self) -> Tensor:
        return torch.tensor([g.box for g in self.glyphs], dtype=torch.float32).view(-1, 4)


def train_glyph_classifier(pages: Sequence[Tensor], glyph_sets: Sequence[GlyphSet], *, size: int,
                           width: int, steps: int, batch_size: int, lr: float, jitter: float,
                           seed: int) -> GlyphClassifier:  # fmt: skip
    """Fit a `GlyphClassifier` on the sharp glyphs of `pages` (each (3, H, W) in [0, 1]). Each crop's box is
    moved by up to `jitter` pixels per side, so that the classifier reads a letter, not its exact frame."""
    generator = torch.Generator().manual_seed(seed)
    classes = "".join(sorted({g.char for s in glyph_sets for g in s.glyphs}))
    with torch.random.fork_rng():  # the seed draws the initial weights, and leaves the global RNG alone
        torch.manual_seed(seed)
        classifier = GlyphClassifier(classes, size, width)
    stack = torch.stack(list(pages))
    page_index = torch.cat([torch.full((len(s.glyphs),), p) for p, s in enumerate(glyph_sets)])
    labels = torch.cat([classifier.labels(s.glyphs) for s in glyph_sets])
    boxes = torch.cat([s.boxes for s in glyph_sets])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    classifier.train()
    for _ in range(steps):
        pick = torch.randint(len(labels), (batch_size,), generator=generator)
        moved = boxes[pick] + (torch.rand(batch_size, 4, generator=generator) * 2 - 1) * jitter
        crops = glyph_crops(stack, moved, page_index[pick], size)
        loss = F.cross_entropy(classifier(crops), labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


@torch.no_grad()
def read_glyphs(classifier: GlyphClassifier, image: Tensor, glyph_set: GlyphSet) -> Tensor:
    """Whether each glyph of `glyph_set` is read as its character in `image` (3, H, W): a bool per glyph."""
    if not glyph_set.glyphs:
        return torch.zeros(0, dtype=torch.bool)
    crops = glyph_crops(image[None], glyph_set.boxes, torch.zeros(len(glyph_set.glyphs)), classifier.size)
    return classifier(crops).argmax(1) == classifier.labels(glyph_set.glyphs)


def readability(
    classifier: GlyphClassifier, images: Sequence[Tensor], glyph_sets: Sequence[GlyphSet]
) -> float:
    """The share of all glyphs of `images` read correctly (0 to 1): the character accuracy."""
    read = torch.cat([read_glyphs(classifier, im, s) for im, s in zip(images, glyph_sets)])
    return float(read.float().mean()) if len(read) else float("nan")
