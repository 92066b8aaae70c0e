"""Golden numbers of the SD2 path: the tiny student of `tiny_student` (two seeded training iterations,
exported) and its 1- and 4-step upscales of a fixed image must stay bit-identical to the files recorded
under tests/data/golden/. Both run on one thread (`one_thread`): CPU kernels split their sums by thread
count. The files were recorded on an x86-64 CPU in fp32; a CPU whose kernels round differently needs
them re-recorded there, from the commit that recorded them. A change that moves them on purpose
re-records them with `ADDSR_PL_RECORD_GOLDEN=1 pytest tests/test_golden.py` and says why in its commit."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.models.trainable import official_modules

from conftest import one_thread

GOLDEN = Path(__file__).parent / "data" / "golden"
RECORD = os.environ.get("ADDSR_PL_RECORD_GOLDEN") == "1"
STEP_COUNTS = (1, 4)
SEED = 0


def trained_weights(pipeline: AddSRPipeline) -> dict[str, torch.Tensor]:
    """The exported weights of the set this run trained (`method.trainable: official`); the rest of the
    student is the frozen teacher's and cannot move."""
    unet, controlnet = pipeline.denoiser.unet, pipeline.denoiser.controlnet
    trained = {id(p) for m in official_modules(unet, controlnet) for p in m.parameters()}
    return {
        f"{part}.{name}": p.detach().clone().contiguous()
        for part, model in (("unet", unet), ("controlnet", controlnet))
        for name, p in model.named_parameters()
        if id(p) in trained
    }


def upscales(pipeline: AddSRPipeline, lr: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"upscale_{n}step": pipeline(lr, steps=n, generator=torch.Generator().manual_seed(SEED)).contiguous()
        for n in STEP_COUNTS
    }


def compare(name: str, actual: dict[str, torch.Tensor]) -> None:
    path = GOLDEN / name
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(actual, str(path))
    expected = load_file(str(path))
    assert sorted(actual) == sorted(expected), f"{name}: the tensors' names changed"
    for key, value in expected.items():
        diff = (
            (actual[key].double() - value.double()).abs().max().item()
            if actual[key].shape == value.shape
            else None
        )
        assert torch.equal(actual[key], value), (
            f"{name}: {key} differs from the golden copy (max |diff| {diff})"
        )


@pytest.fixture(scope="module")
def pipeline(tiny_student):
    return AddSRPipeline.from_folder(tiny_student)


def test_the_exported_students_trained_weights_are_the_golden_ones(pipeline):
    weights = trained_weights(pipeline)
    assert weights, "the run trained nothing"
    compare("student_trained_weights.safetensors", weights)


def test_the_students_1_and_4_step_upscales_are_the_golden_ones(pipeline, sample_pair):
    _, lr = sample_pair
    with one_thread():
        images = upscales(pipeline, lr)
    compare("student_upscales.safetensors", images)
