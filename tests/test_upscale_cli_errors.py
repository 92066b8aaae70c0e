"""`addsr-pl upscale` on bad arguments and environments: one line naming the problem and the fix, exit 2,
no traceback, nothing written; and the flags that control output quality and tiling."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from addsr_pl.core.student_format import MANIFEST
from addsr_pl.upscale import check_settings, main, parser, settings_from


def save_photo(path, h=12, w=16, seed=0, bits=8):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(pixels).save(path)
    return path


def fails_with_one_line(capsys, argv, *fragments):
    """Exit 2, exactly one line on stderr containing every fragment, no traceback."""
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    save_photo(root / "a.png")
    save_photo(root / "sub" / "b.png", seed=1)
    return root


def test_two_inputs_mapping_to_one_output(tmp_path, capsys):
    root = tmp_path / "in"
    save_photo(root / "a.png")
    Image.open(root / "a.png").convert("RGB").save(root / "a.jpg")
    out = tmp_path / "out"
    fails_with_one_line(
        capsys, [str(root), "-o", str(out), "--model", "m", "--format", "png"], "a.png", "a.jpg"
    )
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(photos, tmp_path, capsys):
    fails_with_one_line(
        capsys,
        [str(photos), "-o", str(tmp_path / "o"), "--model", "m", "--device", "cuda"],
        "--device cuda",
        "cpu",
    )


def test_unknown_device_name(photos, tmp_path, capsys):
    fails_with_one_line(
        capsys, [str(photos), "-o", str(tmp_path / "o"), "--model", "m", "--device", "gpu7"], "gpu7"
    )


@pytest.mark.parametrize("value", ["-2", "0"])
def test_outscale_must_be_positive(photos, tmp_path, capsys, value):
    fails_with_one_line(
        capsys,
        [str(photos), "-o", str(tmp_path / "o"), "--model", "m", "--outscale", value],
        "--outscale",
        "> 0",
    )


@pytest.mark.parametrize("flag", ["--tile-size", "--vae-tile-size"])
def test_tile_sizes_must_be_positive(photos, tmp_path, capsys, flag):
    fails_with_one_line(
        capsys, [str(photos), "-o", str(tmp_path / "o"), "--model", "m", flag, "0"], flag, ">= 1"
    )


def test_vae_tile_size_below_its_overlap_names_the_overlap_flag(photos, tmp_path, capsys):
    argv = [str(photos), "-o", str(tmp_path / "o"), "--model", "m", "--vae-tile-size", "64"]
    fails_with_one_line(capsys, argv, "--vae-tile-size 64", "--vae-tile-overlap")
    # with a smaller overlap the same tile size is accepted
    settings = settings_from(parser().parse_args([*argv, "--vae-tile-overlap", "16"]))
    check_settings(settings)
    assert settings["tiling"]["vae_tile_size"] == 64 and settings["tiling"]["vae_overlap"] == 16


def test_output_equal_to_the_input_folder(photos, capsys):
    fails_with_one_line(capsys, [str(photos), "-o", str(photos), "--model", "m"], "is the input folder")


def test_a_run_directory_as_model_points_to_its_student(photos, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / MANIFEST).write_text(json.dumps({"format": "addsr-pl-student"}))
    err = fails_with_one_line(
        capsys, [str(photos), "-o", str(tmp_path / "o"), "--model", str(run)], "run directory"
    )
    assert f"--model {run / 'student'}" in err


def test_a_missing_model_folder(photos, tmp_path, capsys):
    fails_with_one_line(
        capsys, [str(photos), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nope")], "no such folder"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_any_work(photos, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        fails_with_one_line(capsys, [str(photos), "-o", str(locked / "out"), "--model", "m"], "writable")
    finally:
        locked.chmod(0o755)


def test_output_under_a_file_fails_before_any_work(photos, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    fails_with_one_line(capsys, [str(photos), "-o", str(blocker / "out"), "--model", "m"], "not a folder")


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [("--timesteps", "999,abc", "--timesteps"), ("--jpeg-quality", "0", "--jpeg-quality"),
     ("--psr-weight", "1.5", "--psr-weight"), ("--steps", "0", "--steps")],
)  # fmt: skip
def test_bad_numbers(photos, tmp_path, capsys, flag, value, fragment):
    fails_with_one_line(
        capsys, [str(photos), "-o", str(tmp_path / "o"), "--model", "m", flag, value], fragment
    )


def test_help_shows_the_defaults_of_conf_upscale(capsys):
    text = parser().format_help()
    for fragment in (
        "(default: 4)",
        "(default: adain)",
        "(default: 95)",
        "--vae-tile-overlap",
        "--jpeg-quality",
    ):
        assert fragment in " ".join(text.split()), fragment


def test_jpeg_quality_and_the_16_bit_warning(tiny_student, tmp_path, capsys):
    root = tmp_path / "in"
    save_photo(root / "gray16.png", h=16, w=16, bits=16)
    sizes = {}
    for quality in (10, 95):
        out = tmp_path / f"q{quality}"
        code = main([str(root), "-o", str(out), "--model", tiny_student, "--format", "jpg",
                     "--jpeg-quality", str(quality), "--no-progress"])  # fmt: skip
        assert code == 0
        sizes[quality] = (out / "gray16.jpg").stat().st_size
        err = capsys.readouterr().err
        assert "16-bit input is written as 8-bit JPEG" in err
    assert sizes[10] < sizes[95]
