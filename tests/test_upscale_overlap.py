"""Folders upscaled with reading and writing beside the model: the reader runs ahead of the sampler, the
writer's failures are that image's, unexpected errors still stop the run."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from addsr_pl.inference.overlap import BackgroundReader, BackgroundWriter
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.upscale import parser, settings_from

# Bounds a wait that a correct implementation ends at once: a failing test, not a slow one.
WAIT_S = 30


def wait_for(condition) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def photos(folder, count, size=(12, 16)):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def upscaler_for(student, **overrides) -> Upscaler:
    settings = settings_from(parser().parse_args(["x", "-o", "y", "--model", "m", "--steps", "1"]))
    settings |= overrides
    return Upscaler(AddSRPipeline.from_folder(student), settings)


def test_the_reader_decodes_the_next_images_while_the_sampler_runs(tiny_student, tmp_path):
    """During the first image's sampler call the reader has already decoded the next ones: it waits for
    them inside the call, which a reader that only reads when asked never satisfies."""
    sources = photos(tmp_path / "in", 3)
    upscaler = upscaler_for(tiny_student, batch_size=1, prefetch=2)
    ahead = []

    def during_the_call(module, args):
        if not ahead:
            ahead.append(wait_for(lambda: upscaler.reader.done >= 3))

    hook = upscaler.pipeline.denoiser.register_forward_pre_hook(during_the_call)
    try:
        report = upscaler.run([(s, tmp_path / "out" / s.name) for s in sources], progress=False)
    finally:
        hook.remove()
    assert ahead == [True]
    assert len(report.written) == 3 and report.ok


def test_a_failed_write_is_that_images_failure_and_the_others_are_written(tiny_student, tmp_path):
    sources = photos(tmp_path / "in", 3)
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    targets = [tmp_path / "out" / "0.png", tmp_path / "blocked" / "1.png", tmp_path / "out" / "2.png"]
    upscaler = upscaler_for(tiny_student, batch_size=2)
    report = upscaler.run(list(zip(sources, targets)), progress=False)
    assert list(report.failed) == [sources[1]]
    assert report.written == [targets[0], targets[2]]
    assert all(t.is_file() for t in report.written)


def test_same_size_images_share_sampler_calls_across_reads(tiny_student, tmp_path):
    """Five same-size images at batch size 4: two sampler calls (4 + 1), whatever order the reader
    hands them in; a different size between them waits in its own group."""
    sources = photos(tmp_path / "in", 5)
    odd = photos(tmp_path / "odd", 1, size=(10, 14))[0]
    order = [sources[0], odd, *sources[1:]]
    upscaler = upscaler_for(tiny_student, batch_size=4)
    batches = []
    hook = upscaler.pipeline.codec.vae.decoder.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0])
    )
    try:
        report = upscaler.run(
            [(s, tmp_path / "out" / f"{i}.png") for i, s in enumerate(order)], progress=False
        )
    finally:
        hook.remove()
    assert report.ok and len(report.written) == 6
    assert sorted(batches) == [1, 1, 4]


def test_the_writer_works_beside_its_caller_and_hands_back_an_unexpected_error():
    release = threading.Event()
    written = []

    def write(job):
        release.wait(WAIT_S)
        if job == "bad":
            raise RuntimeError("disk on fire")
        written.append(job)

    writer = BackgroundWriter(write, depth=2)
    writer.submit("a")  # returns while "a" is still being written
    writer.submit("b")
    assert written == []
    release.set()
    writer.submit("bad")
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.close()
    assert written == ["a", "b"]


def test_the_reader_hands_back_an_unexpected_error_in_order():
    def read(item):
        if item == 2:
            raise KeyError("unexpected")
        return item * 10

    seen = []
    with pytest.raises(KeyError, match="unexpected"):
        for _, result in BackgroundReader(range(4), read, depth=1):
            seen.append(result)
    assert seen == [0, 10]
