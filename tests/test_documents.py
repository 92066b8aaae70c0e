"""Rendered text pages: the demo's domain. Pages are reproducible, crops and held-out pairs well formed."""

import numpy as np
import torch

from addsr_pl.data.documents import DocumentDataset, DocumentPairedDataset, render_page


def test_a_page_is_the_same_image_on_every_call_and_pages_differ():
    page = render_page(3, 128)
    assert page.shape == (128, 128, 3) and page.dtype == np.uint8
    assert np.array_equal(page, render_page(3, 128))
    assert not np.array_equal(page, render_page(4, 128))
    # text on a light background: mostly light pixels, and dark ink present
    assert np.median(page) >= 200 and page.min() <= 120


def test_training_crops_are_drawn_per_key_and_held_out_pairs_are_bicubic_lr():
    train = DocumentDataset(pages=2, page_size=128, crop_size=64, repeats=3, seed=1)
    assert len(train) == 6
    a, b = train[(0, 11)]["hr"], train[(0, 12)]["hr"]
    assert a.shape == (3, 64, 64) and torch.equal(a, train[(0, 11)]["hr"]) and not torch.equal(a, b)
    pairs = DocumentPairedDataset(seeds=[1000, 1001], page_size=256, crop_size=128, scale=4)
    item = pairs[1]
    assert (
        item["name"] == "page1001" and item["hr"].shape == (3, 128, 128) and item["lr"].shape == (3, 32, 32)
    )
    down = torch.nn.functional.interpolate(
        item["hr"][None], scale_factor=0.25, mode="bicubic", antialias=True
    )
    assert (down[0].clamp(0, 1) - item["lr"]).abs().max() < 1 / 255 + 1e-6


def test_a_crop_larger_than_the_page_is_refused():
    import pytest

    with pytest.raises(ValueError, match="crops no larger than the page"):
        DocumentDataset(pages=1, page_size=64, crop_size=128)
