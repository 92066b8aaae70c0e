"""The demo's headline measure: glyph boxes of the rendered pages, and a classifier that reads sharp text and
fails on smeared text."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from addsr_pl.data.documents import _font, page_glyphs, page_layout, render_page
from addsr_pl.evaluation.readability import GlyphSet, readability, train_glyph_classifier

SIZE = 192


def test_the_glyph_boxes_are_where_the_page_draws_its_characters():
    """Each line drawn character by character at its advance is the line drawn whole, and each box holds
    its character's ink: the boxes are the page's, not an approximation."""
    _, lines = page_layout(7, SIZE)
    glyphs = page_glyphs(7, SIZE)
    assert sum(ch.isalnum() for line in lines for ch in line.text) == len(glyphs) > 50
    for line in lines[:4]:
        font = _font(line.font_size)
        whole, apart = Image.new("L", (4 * SIZE, 100)), Image.new("L", (4 * SIZE, 100))
        ImageDraw.Draw(whole).text((line.x + SIZE, 20), line.text, fill=255, font=font)
        for i, char in enumerate(line.text):
            ImageDraw.Draw(apart).text(
                (line.x + SIZE + font.getlength(line.text[:i]), 20), char, fill=255, font=font
            )
        assert np.array_equal(np.asarray(whole) > 127, np.asarray(apart) > 127)
    page = render_page(7, SIZE).astype(int)
    background = page[0, 0]
    inked = [g for g in glyphs if g.box[0] >= 0 and g.box[2] <= SIZE and g.box[1] >= 0 and g.box[3] <= SIZE]
    for g in inked:
        left, top, right, bottom = g.box
        assert np.abs(page[top:bottom, left:right] - background).sum(-1).max() > 100, g


@pytest.fixture(scope="module")
def reader():
    pages = [torch.from_numpy(render_page(s, SIZE).copy()).permute(2, 0, 1) / 255 for s in range(12)]
    glyphs = [GlyphSet.inside(page_glyphs(s, SIZE), (0, 0), SIZE, SIZE) for s in range(12)]
    classifier = train_glyph_classifier(pages, glyphs, size=20, width=16, steps=250, batch_size=128, lr=3e-3,
                                        jitter=1.5, seed=0)  # fmt: skip
    held_out = [torch.from_numpy(render_page(s, SIZE).copy()).permute(2, 0, 1) / 255 for s in (1000, 1001)]
    held_glyphs = [GlyphSet.inside(page_glyphs(s, SIZE), (0, 0), SIZE, SIZE) for s in (1000, 1001)]
    return classifier, held_out, held_glyphs


def test_the_classifier_reads_sharp_held_out_pages_and_not_smeared_ones(reader):
    classifier, pages, glyphs = reader
    sharp = readability(classifier, pages, glyphs)
    smeared = [F.interpolate(F.interpolate(p[None], scale_factor=0.25, mode="area"), scale_factor=4,
                             mode="bicubic").clamp(0, 1)[0] for p in pages]  # fmt: skip
    blurred = readability(classifier, smeared, glyphs)
    assert sharp > 0.85 and blurred < sharp - 0.3, (sharp, blurred)
    # a colour cast and a contrast change do not matter: each crop is normalised
    cast = [0.1 + 0.15 * p * torch.tensor([1.0, 0.6, 0.8])[:, None, None] for p in pages]
    assert abs(readability(classifier, cast, glyphs) - sharp) < 0.05
    # a wrong letter is misread: every glyph box of page 1000 read on page 1001
    assert readability(classifier, pages[1:], glyphs[:1]) < 0.2
