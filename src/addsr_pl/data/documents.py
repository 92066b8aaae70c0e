"""Rendered text pages: a narrow image domain that needs no download, for the CPU demo.

Text is what bicubic interpolation does worst on (every stroke edge is smeared over four pixels) and
what a small network learns fastest (a few stroke shapes at a few sizes), so minutes of CPU training
show a tiny AddSR teacher and student restoring detail that bicubic loses. Pages hold lines of words in
Pillow's bundled font at random sizes, dark random colours on light random backgrounds; page `seed`
is always the same image. Training draws crops from pages `0 .. pages - 1`; the held-out pairs are
other pages (`DocumentPairedDataset`, seeds from `conf/data/documents.yaml`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from addsr_pl.data.datasets import center_crop, random_crop_flip, resolve_key
from addsr_pl.data.degradation import BicubicDegradation
from addsr_pl.data.io import to_tensor

# Words the pages are made of (their frequency does not matter, only their letter shapes).
WORDS = tuple(
    [
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "into",
        "over",
        "under",
        "and",
        "or",
        "but",
        "not",
        "no",
        "yes",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "we",
        "you",
        "they",
        "he",
        "she",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "image",
        "images",
        "super",
        "resolution",
        "diffusion",
        "student",
        "teacher",
        "step",
        "steps",
        "noise",
        "latent",
        "prediction",
        "refinement",
        "timestep",
        "adaptive",
        "weight",
        "distillation",
        "adversarial",
        "quality",
        "restore",
        "restored",
        "sharp",
        "edge",
        "edges",
        "pixel",
        "pixels",
        "photo",
        "photos",
        "text",
        "page",
        "pages",
        "line",
        "lines",
        "letter",
        "letters",
        "word",
        "words",
        "model",
        "models",
        "train",
        "trained",
        "training",
        "test",
        "table",
        "figure",
        "section",
        "result",
        "results",
        "PSNR",
        "SSIM",
        "AddSR",
        "SeeSR",
        "RAM",
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "10",
        "16",
        "32",
        "64",
        "128",
        "256",
        "512",
        "1024",
        "2048",
        "x4",
        "x8",
        "(a)",
        "(b)",
        "(c)",
        "-",
        ",",
        ".",
        ";",
        ":",
        "?",
        "!",
    ]
)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError(
            "Rendered document pages need Pillow's bundled TrueType font, which needs Pillow built with "
            "FreeType (the wheels on PyPI are): reinstall Pillow with `pip install --force-reinstall pillow`."
        )
    return font


def render_page(seed: int, size: int, font_sizes: Sequence[int] = (14, 40)) -> np.ndarray:
    """Page `seed`: a `size` x `size` RGB uint8 image of text lines, the same on every call."""
    rng = random.Random(seed)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    page = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(page)
    y = rng.randint(-font_sizes[0], font_sizes[0])
    while y < size:
        font_size = rng.randint(*font_sizes)
        ink = tuple(rng.randint(0, 120) for _ in range(3))
        words = " ".join(rng.choice(WORDS) for _ in range(4 + 2 * size // font_size))
        draw.text((rng.randint(-2 * font_size, font_size), y), words, fill=ink, font=_font(font_size))
        y += round(font_size * rng.uniform(1.1, 1.6))
    return np.asarray(page)


class DocumentDataset(Dataset):
    """Random crops (and flips) of the rendered pages `0 .. pages - 1`: a training set of text."""

    def __init__(self, pages: int, page_size: int, crop_size: int, font_sizes: Sequence[int] = (14, 40),
                 flip: bool = True, repeats: int = 1, seed: int = 0):  # fmt: skip
        if pages < 1 or crop_size > page_size:
            raise ValueError(
                f"DocumentDataset: pages = {pages}, crop_size = {crop_size}, page_size = {page_size}: "
                "needs at least one page and crops no larger than the page."
            )
        self.pages = [render_page(s, page_size, tuple(font_sizes)) for s in range(pages)]
        self.crop_size, self.flip, self.repeats, self.seed = int(crop_size), flip, int(repeats), seed

    def __len__(self) -> int:
        return len(self.pages) * self.repeats

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, draw_seed = resolve_key(item, self.seed)
        page = self.pages[index % len(self.pages)]
        return {"hr": to_tensor(random_crop_flip(page, self.crop_size, self.flip, draw_seed))}


class DocumentPairedDataset(Dataset):
    """Held-out pairs: centre `crop_size` crops of the pages `seeds` and their bicubic LR, named `page<seed>`."""

    def __init__(self, seeds: Sequence[int], page_size: int, crop_size: int, scale: int = 4,
                 font_sizes: Sequence[int] = (14, 40)):  # fmt: skip
        self.names = [f"page{s}" for s in seeds]
        degradation = BicubicDegradation(scale)
        self.pairs = []
        for seed in seeds:
            hr = to_tensor(center_crop(render_page(seed, page_size, tuple(font_sizes)), crop_size))
            hr_target, lr = degradation(hr[None])
            self.pairs.append((hr_target[0], lr[0]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        hr, lr = self.pairs[index]
        return {"hr": hr, "lr": lr, "name": self.names[index]}
