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
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from addsr_pl.data.datasets import InMemoryCropDataset, InMemoryPairedDataset

# Words the pages are made of (their frequency does not matter, only their letter shapes).
WORDS = (
    "a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "with", "from", "into", "over", "under", "and",
    "or", "but", "not", "no", "yes", "this", "that", "these", "those", "it", "its", "we", "you", "they", "he",
    "she", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "image", "images",
    "super", "resolution", "diffusion", "student", "teacher", "step", "steps", "noise", "latent", "prediction",
    "refinement", "timestep", "adaptive", "weight", "distillation", "adversarial", "quality", "restore",
    "restored", "sharp", "edge", "edges", "pixel", "pixels", "photo", "photos", "text", "page", "pages", "line",
    "lines", "letter", "letters", "word", "words", "model", "models", "train", "trained", "training", "test",
    "table", "figure", "section", "result", "results", "PSNR", "SSIM", "AddSR", "SeeSR", "RAM", "0", "1", "2",
    "3", "4", "5", "6", "7", "8", "9", "10", "16", "32", "64", "128", "256", "512", "1024", "2048", "x4", "x8",
    "(a)", "(b)", "(c)", "-", ",", ".", ";", ":", "?", "!",
)  # fmt: skip


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError(
            "Rendered document pages need Pillow's bundled TrueType font, which needs Pillow built with "
            "FreeType (the wheels on PyPI are): reinstall Pillow with `pip install --force-reinstall pillow`."
        )
    return font


@dataclass(frozen=True)
class TextLine:
    """One line of a page: `text` drawn at (`x`, `y`) (its left-ascender point) in `font_size` and `ink`."""

    x: int
    y: int
    text: str
    font_size: int
    ink: tuple[int, int, int]


@dataclass(frozen=True)
class Glyph:
    """One drawn character and its ink box (left, top, right, bottom; page pixels, right/bottom exclusive)."""

    char: str
    box: tuple[int, int, int, int]


def page_layout(seed: int, size: int, font_sizes: Sequence[int] = (14, 40)) -> tuple[tuple, list[TextLine]]:
    """Page `seed`'s background colour and text lines: everything `render_page` draws, without drawing."""
    rng = random.Random(seed)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    lines = []
    y = rng.randint(-font_sizes[0], font_sizes[0])
    while y < size:
        font_size = rng.randint(*font_sizes)
        ink = tuple(rng.randint(0, 120) for _ in range(3))
        words = " ".join(rng.choice(WORDS) for _ in range(4 + 2 * size // font_size))
        lines.append(TextLine(rng.randint(-2 * font_size, font_size), y, words, font_size, ink))
        y += round(font_size * rng.uniform(1.1, 1.6))
    return background, lines


def render_page(seed: int, size: int, font_sizes: Sequence[int] = (14, 40)) -> np.ndarray:
    """Page `seed`: a `size` x `size` RGB uint8 image of text lines, the same on every call."""
    background, lines = page_layout(seed, size, font_sizes)
    page = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(page)
    for line in lines:
        draw.text((line.x, line.y), line.text, fill=line.ink, font=_font(line.font_size))
    return np.asarray(page)


def page_glyphs(seed: int, size: int, font_sizes: Sequence[int] = (14, 40)) -> list[Glyph]:
    """The letters and digits of page `seed` with their ink boxes, as `render_page` draws them (the bundled
    font is laid out without kerning, so a character sits at the advance of the text before it)."""
    glyphs = []
    for line in page_layout(seed, size, font_sizes)[1]:
        font = _font(line.font_size)
        for i, char in enumerate(line.text):
            if not char.isalnum():
                continue
            x = line.x + font.getlength(line.text[:i])
            left, top, right, bottom = font.getbbox(char)
            glyphs.append(Glyph(char, (round(x + left), line.y + top, round(x + right), line.y + bottom)))
    return glyphs


class DocumentDataset(InMemoryCropDataset):
    """Random crops (and flips) of the rendered pages `0 .. pages - 1`: a training set of text."""

    def __init__(self, pages: int, page_size: int, crop_size: int, font_sizes: Sequence[int] = (14, 40),
                 flip: bool = True, repeats: int = 1, seed: int = 0):  # fmt: skip
        if pages < 1 or crop_size > page_size:
            raise ValueError(
                f"DocumentDataset: pages = {pages}, crop_size = {crop_size}, page_size = {page_size}: "
                "needs at least one page and crops no larger than the page."
            )
        rendered = [render_page(s, page_size, tuple(font_sizes)) for s in range(pages)]
        super().__init__(rendered, crop_size, flip, repeats, seed)


class DocumentPairedDataset(InMemoryPairedDataset):
    """Held-out pairs: centre `crop_size` crops of the pages `seeds` and their bicubic LR, named `page<seed>`."""

    def __init__(self, seeds: Sequence[int], page_size: int, crop_size: int, scale: int = 4,
                 font_sizes: Sequence[int] = (14, 40)):  # fmt: skip
        pages = [render_page(s, page_size, tuple(font_sizes)) for s in seeds]
        super().__init__([f"page{s}" for s in seeds], pages, crop_size, scale)
