"""Datasets: image modes, bad files, HR folders, paired and LR-only sets, the Table 2 cases."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from addsr_pl.data.datamodule import AddSRDataModule
from addsr_pl.data.datasets import HRFolderDataset, LRFolderDataset, PairedFolderDataset
from addsr_pl.data.degradation import BicubicDegradation
from addsr_pl.data.io import ImageReadError, read_rgb
from addsr_pl.data.synthetic import Table2Dataset, load_table2_case, make_table2_case


def photo(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_folder(folder, count: int, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(photo(*size, seed=i)).save(folder / f"img_{i:03d}.png")
    return folder


# ------------------------------------------------------------------------------ image modes --
def test_grayscale_is_replicated(tmp_path):
    gray = photo()[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_rgb(tmp_path / "g.png")
    assert out.dtype == np.uint8 and out.shape == (40, 48, 3)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red 200
    rgba[..., 3] = np.array([0, 255, 128, 64], dtype=np.uint8)[None, :]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png").astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    expected = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))
    np.testing.assert_array_equal(out, expected)
    assert (out[:, 0] == 255).all()  # fully transparent -> white


def test_palette_with_and_without_transparency(tmp_path):
    rgb = photo(8, 8)
    image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), np.asarray(image.convert("RGB")))
    index = np.asarray(image)[0, 0]
    image.save(tmp_path / "pt.png", transparency=int(index))
    out = read_rgb(tmp_path / "pt.png")
    assert (out[np.asarray(image) == index] == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.fromarray(photo()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = read_rgb(tmp_path / "c.jpg")
    assert out.shape == (40, 48, 3) and out.dtype == np.uint8
    # close to the RGB it came from (JPEG loses a little)
    assert np.abs(out.astype(int) - photo().astype(int)).mean() < 20


def test_16bit_grayscale_and_colour_keep_their_precision(tmp_path):
    values = np.arange(1000, 1000 + 40 * 48, dtype=np.uint16).reshape(40, 48)
    Image.fromarray(values).save(tmp_path / "g16.png")
    colour = np.stack([values, values + 1, values + 2], -1)
    cv2.imwrite(str(tmp_path / "c16.png"), colour[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(tmp_path / "c16.tif"), colour[..., ::-1])
    gray3 = np.repeat(values[..., None], 3, 2)
    for name, expected in (("g16.png", gray3), ("c16.png", colour), ("c16.tif", colour)):
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, expected)
    # neighbouring 16-bit levels stay distinct in the float tensor
    hr = HRFolderDataset(tmp_path, crop_size=8, flip=False, file_list=None)
    assert hr[0]["hr"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty_file"])
def test_unreadable_files_raise_a_read_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    if kind == "truncated":
        Image.fromarray(photo(64, 64)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:600])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    else:
        path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_rgb(path)


# ------------------------------------------------------------------------------ HR folders --
def test_empty_folder_and_wrong_path_fail_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        HRFolderDataset(tmp_path, crop_size=16)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HRFolderDataset(tmp_path / "nowhere", crop_size=16)


def test_recursive_scan_file_list_and_first_n(tmp_path):
    write_folder(tmp_path / "a", 3)
    write_folder(tmp_path / "b" / "c", 2)
    assert len(HRFolderDataset(tmp_path, 16)) == 5
    with pytest.raises(FileNotFoundError, match="recursive=False"):
        HRFolderDataset(tmp_path, 16, recursive=False)  # the images sit in sub-folders only
    assert len(HRFolderDataset(tmp_path, 16, first_n=4)) == 4
    (tmp_path / "list.txt").write_text("b/c/img_001.png\na/img_002.png\n")
    listed = HRFolderDataset(tmp_path, 16, file_list=tmp_path / "list.txt")
    assert [p.relative_to(tmp_path).as_posix() for p in listed.files] == ["b/c/img_001.png", "a/img_002.png"]


def test_small_images_are_reflect_padded_and_crops_are_deterministic(tmp_path):
    write_folder(tmp_path, 2, size=(20, 30))
    dataset = HRFolderDataset(tmp_path, crop_size=64, flip=False)
    hr = dataset[(0, 123)]["hr"]
    assert hr.shape == (3, 64, 64)
    original = torch.from_numpy(photo(20, 30, seed=0)).permute(2, 0, 1).float() / 255
    # reflect padding (edge not repeated) at the bottom/right
    torch.testing.assert_close(hr[:, 20, :30], original[:, 18])
    torch.testing.assert_close(hr[:, :20, 30], original[:, :, 28])
    assert torch.equal(dataset[(1, 5)]["hr"], dataset[(1, 5)]["hr"])


def test_a_bad_file_is_skipped_warned_and_counted(tmp_path):
    write_folder(tmp_path, 6)
    (tmp_path / "img_002.png").write_bytes(b"not an image")
    dataset = HRFolderDataset(tmp_path, crop_size=16)
    with pytest.warns(UserWarning, match="img_002"):
        sample = dataset[(2, 0)]
    assert sample["bad_files"] == [str(tmp_path / "img_002.png")]
    assert sample["hr"].shape == (3, 16, 16)
    dm = AddSRDataModule(
        dataset, None, BicubicDegradation(4), crop_size=16, batch_size=2, max_bad_fraction=0.2
    )
    batches = list(dm.train_dataloader())  # the dataset remembers the bad file: no second warning
    assert len(batches) == 3 and all("bad_files" not in b for b in batches)
    assert dm.bad_files == [str(tmp_path / "img_002.png")]


def test_bad_files_from_workers_reach_the_main_process(tmp_path):
    write_folder(tmp_path, 6)
    (tmp_path / "img_004.png").write_bytes(b"\x89PNG broken")
    dataset = HRFolderDataset(tmp_path, crop_size=16)
    dm = AddSRDataModule(
        dataset, None, BicubicDegradation(4), crop_size=16, batch_size=2, num_workers=2, max_bad_fraction=0.2
    )
    list(dm.train_dataloader())
    assert dm.bad_files == [str(tmp_path / "img_004.png")]


def test_too_many_bad_files_stop_the_run_with_the_fraction_in_the_message(tmp_path):
    write_folder(tmp_path, 6)
    for name in ("img_001.png", "img_003.png"):
        (tmp_path / name).write_bytes(b"junk")
    dataset = HRFolderDataset(tmp_path, crop_size=16)
    dm = AddSRDataModule(
        dataset, None, BicubicDegradation(4), crop_size=16, batch_size=2, max_bad_fraction=0.2
    )
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="max_bad_fraction=0.2"):
        list(dm.train_dataloader())


# ------------------------------------------------------------------------- evaluation sets --
def test_paired_folders_match_by_stem_not_listing_order(tmp_path):
    (tmp_path / "test_HR").mkdir()
    (tmp_path / "test_LR").mkdir()
    for i, name in enumerate(["Canon_010", "Nikon_002", "Canon_001"]):
        hr = photo(32, 32, seed=i)
        Image.fromarray(hr).save(tmp_path / "test_HR" / f"{name}_HR.png")
        Image.fromarray(hr[::4, ::4]).save(tmp_path / "test_LR" / f"{name}_LR4.png")
    dataset = PairedFolderDataset(tmp_path, scale=4)
    assert [dataset[i]["name"] for i in range(3)] == ["Canon_001", "Canon_010", "Nikon_002"]
    for i in range(3):
        sample = dataset[i]
        assert torch.equal(sample["hr"][:, ::4, ::4], sample["lr"])
    cropped = PairedFolderDataset(tmp_path, scale=4, lr_crop=4)
    assert cropped[0]["lr"].shape == (3, 4, 4) and cropped[0]["hr"].shape == (3, 16, 16)


def test_paired_folders_report_missing_partners_and_wrong_scale(tmp_path):
    write_folder(tmp_path / "test_HR", 2, size=(32, 32))
    write_folder(tmp_path / "test_LR", 1, size=(8, 8))
    with pytest.raises(ValueError, match="no partner"):
        PairedFolderDataset(tmp_path)
    write_folder(tmp_path / "test_LR", 2, size=(16, 16))
    with pytest.raises(ValueError, match="expected exactly x4"):
        PairedFolderDataset(tmp_path)[0]


def test_lr_only_folder(tmp_path):
    write_folder(tmp_path, 2, size=(30, 20))
    dataset = LRFolderDataset(tmp_path)
    assert dataset[1]["name"] == "img_001" and dataset[1]["lr"].shape == (3, 30, 20)


# ------------------------------------------------------------------------------- Table 2 --
def digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", ["bicubic", "blur", "noise", "mixture"])
def test_table2_cases_are_bit_identical_across_runs(tmp_path, case):
    hr_root = write_folder(tmp_path / "hr", 3, size=(70, 90))
    first = make_table2_case(hr_root, case, tmp_path / "run1", seed=3, crop_size=64)
    second = make_table2_case(hr_root, case, tmp_path / "run2", seed=3, crop_size=64)
    assert digest(first) == digest(second)
    dataset = PairedFolderDataset(first)
    assert len(dataset) == 3
    assert dataset[0]["hr"].shape == (3, 64, 64) and dataset[0]["lr"].shape == (3, 16, 16)


def test_table2_cases_differ_and_follow_their_recipe(tmp_path):
    hr_root = write_folder(tmp_path / "hr", 1, size=(64, 64))
    lrs = {}
    for case in ("bicubic", "blur", "noise", "mixture"):
        lrs[case] = Table2Dataset(hr_root, case, tmp_path / "cache", seed=0, crop_size=64)[0]["lr"]
    hr = torch.from_numpy(photo(64, 64, seed=0)).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(lrs["bicubic"], BicubicDegradation(4)(hr)[1][0])
    noise = (lrs["noise"] - lrs["bicubic"]).flatten()
    assert 0.1 < noise.std().item() < 40 / 255 * 1.05  # sigma 40, reduced by clamping at 0 and 1
    assert load_table2_case("mixture").jpeg_quality == 50
    assert not torch.equal(lrs["blur"], lrs["bicubic"]) and not torch.equal(lrs["mixture"], lrs["blur"])


def test_table2_cache_is_reused_and_unknown_cases_are_named(tmp_path):
    hr_root = write_folder(tmp_path / "hr", 1, size=(64, 64))
    folder = make_table2_case(hr_root, "bicubic", tmp_path / "cache", seed=0, crop_size=64)
    lr = folder / "test_LR" / "img_000.png"
    stamp = lr.stat().st_mtime_ns
    make_table2_case(hr_root, "bicubic", tmp_path / "cache", seed=0, crop_size=64)
    assert lr.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="known cases"):
        make_table2_case(hr_root, "sharpen", tmp_path / "cache")
