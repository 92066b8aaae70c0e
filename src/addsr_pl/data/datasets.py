"""Datasets: HR folders for training, paired and LR-only folders for evaluation, an embedded sample set.

Training datasets return ``{"hr": [3, S, S]}`` crops in [0, 1]; degradation happens later, batched on
the device (`AddSRDataModule.on_after_batch_transfer`). Their random crops and flips are functions
of a per-item seed handed in by the sampler (``dataset[(index, draw_seed)]``), never of a global RNG,
so worker processes and resumed runs see the same crops. Indexing with a plain ``int`` uses the
dataset's own `seed` with epoch 0.

An unreadable file is skipped with a warning: the next readable file (in index order) takes its
place and the skipped path travels with the sample under ``"bad_files"``, so the data module can
count it in the main process even when workers did the reading.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from addsr_pl.data.degradation import BicubicDegradation
from addsr_pl.data.io import ImageReadError, image_size, list_images, read_rgb, to_tensor
from addsr_pl.data.rng import mix_seed

BAD_FILES_KEY = "bad_files"


def resolve_key(item: int | tuple[int, int], seed: int) -> tuple[int, int]:
    """``(index, draw_seed)`` from a sampler key or a plain index (epoch 0 of `seed`)."""
    if isinstance(item, tuple):
        return int(item[0]), int(item[1])
    return int(item), mix_seed(seed, 0, int(item))


def pad_reflect(array: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (edge pixel not repeated) at the bottom/right up to `size`, as the official code does."""
    pad_h, pad_w = max(0, size - array.shape[0]), max(0, size - array.shape[1])
    if pad_h == 0 and pad_w == 0:
        return array
    return np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


def random_crop_flip(array: np.ndarray, size: int, flip: bool, draw_seed: int) -> np.ndarray:
    """A `size`² crop at a random position, horizontally flipped with probability 1/2."""
    array = pad_reflect(array, size)
    gen = torch.Generator().manual_seed(draw_seed)
    top = int(torch.randint(0, array.shape[0] - size + 1, (1,), generator=gen))
    left = int(torch.randint(0, array.shape[1] - size + 1, (1,), generator=gen))
    flip_now = bool(torch.rand((), generator=gen) < 0.5)
    crop = array[top : top + size, left : left + size]
    return crop[:, ::-1] if flip and flip_now else crop


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    array = pad_reflect(array, size)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def collate_samples(samples: list[dict]) -> dict:
    """`default_collate`, except that the skipped-file lists of all samples are joined into one list."""
    bad_files = [path for sample in samples for path in sample.get(BAD_FILES_KEY, ())]
    batch = default_collate([{k: v for k, v in s.items() if k != BAD_FILES_KEY} for s in samples])
    batch[BAD_FILES_KEY] = bad_files
    return batch


class HRFolderDataset(Dataset):
    """Random `crop_size` crops of the HR images in a folder (DIV2K, Flickr2K, LSDIR, FFHQ, your own).

    Args:
        root: folder of images; sub-folders are searched when `recursive`.
        crop_size: side of the square crop; smaller images are reflect-padded first.
        recursive: search sub-folders too.
        file_list: optional text file with one path per line (relative to `root` or absolute);
            it replaces the folder scan and keeps its own order.
        first_n: keep only the first N files (of the file list, or of the sorted scan), e.g. the
            first 20k of LSDIR or 10k of FFHQ.
        flip: random horizontal flips.
        seed: seed for plain-integer indexing; the data module's sampler passes per-item seeds.
        check_sizes: read every file's header once and warn (once) when some are smaller than the crop.
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: int,
        recursive: bool = True,
        file_list: str | Path | None = None,
        first_n: int | None = None,
        flip: bool = True,
        seed: int = 0,
        check_sizes: bool = False,
    ):
        self.root = Path(root)
        self.crop_size = int(crop_size)
        self.flip = flip
        self.seed = seed
        if file_list is not None:
            self.files = self._read_file_list(Path(file_list))
        else:
            self.files = list_images(self.root, recursive=recursive)
        if first_n is not None:
            if first_n < 1:
                raise ValueError(f"first_n must be a positive number of files, got {first_n}.")
            self.files = self.files[:first_n]
        if not self.files:
            raise FileNotFoundError(
                f"No images found in {self.root}"
                + (f" (file list {file_list})" if file_list else f" (recursive={recursive})")
                + "; point the data path at a folder of .png/.jpg/... files."
            )
        self._known_bad: set[int] = set()
        if check_sizes:
            warn_small_images(self.files, self.crop_size, self.root)

    def _read_file_list(self, file_list: Path) -> list[Path]:
        if not file_list.is_file():
            raise FileNotFoundError(f"File list {file_list} does not exist; fix data.train.file_list.")
        lines = [line.strip() for line in file_list.read_text().splitlines()]
        return [p if (p := Path(line)).is_absolute() else self.root / p for line in lines if line]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[np.ndarray, list[str]]:
        """The image at `index`, or the next readable one; also the paths skipped on the way."""
        skipped: list[str] = []
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            if candidate in self._known_bad:  # reported again (no new warning): the log is a set
                skipped.append(str(self.files[candidate]))
                continue
            try:
                return read_rgb(self.files[candidate]), skipped
            except ImageReadError as error:
                self._known_bad.add(candidate)
                skipped.append(str(self.files[candidate]))
                warnings.warn(f"Skipping unreadable image: {error}", stacklevel=2)
        raise RuntimeError(f"None of the {len(self.files)} images under {self.root} can be read.")

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, draw_seed = resolve_key(item, self.seed)
        array, skipped = self.read(index)
        crop = random_crop_flip(array, self.crop_size, self.flip, draw_seed)
        return {"hr": to_tensor(crop), BAD_FILES_KEY: skipped}


def warn_small_images(files: Sequence[Path], crop_size: int, root: Path) -> None:
    """One warning naming how many `files` are smaller than the crop (read from their headers only).

    Such images are reflect-padded up to the crop, as the official code does, which trains on mirrored
    content; unreadable files are left to the reader's own warning.
    """
    small = [path for path in files if (size := image_size(path)) is not None and min(size) < crop_size]
    if small:
        warnings.warn(
            f"{len(small)} of the {len(files)} images under {root} are smaller than the {crop_size}x{crop_size} "
            f"crop (e.g. {small[0]}); they are reflect-padded up to it. Lower data.crop_size or remove them.",
            stacklevel=3,
        )


def hold_out(dataset: HRFolderDataset, count: int, seed: int) -> list[Path]:
    """Move `count` files, chosen by `seed`, out of `dataset` (it never trains on them); return them."""
    if count >= len(dataset.files):
        raise ValueError(
            f"data.val_count={count} would hold out every one of the {len(dataset.files)} images under "
            f"{dataset.root}; lower it (0 = no validation split)."
        )
    order = torch.randperm(len(dataset.files), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    kept = [path for i, path in enumerate(dataset.files) if i not in held]
    held_out = [path for i, path in enumerate(dataset.files) if i in held]
    dataset.files, dataset._known_bad = kept, set()
    return held_out


class HeldOutPairedDataset(Dataset):
    """Fixed validation pairs from HR files: centre `crop_size` crops and their bicubic LR."""

    def __init__(self, files: Sequence[Path], root: Path, crop_size: int, scale: int):
        self.files, self.root = list(files), Path(root)
        self.crop_size = int(crop_size)
        self.degradation = BicubicDegradation(scale)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        hr = to_tensor(center_crop(read_rgb(path), self.crop_size))[None]
        hr_target, lr = self.degradation(hr)
        name = (
            path.relative_to(self.root).with_suffix("").as_posix()
            if path.is_relative_to(self.root)
            else path.stem
        )
        return {"hr": hr_target[0], "lr": lr[0], "name": name}


class ConcatHRDataset(Dataset):
    """Several training datasets one after another (e.g. DIV2K + Flickr2K + LSDIR + FFHQ).

    `parts` is a list, or a mapping from names to datasets (so configs can address each part).
    """

    def __init__(self, parts: Sequence[Dataset] | Mapping[str, Dataset]):
        self.parts = list(parts.values()) if isinstance(parts, Mapping) else list(parts)
        if not self.parts:
            raise ValueError("ConcatHRDataset needs at least one dataset in `parts`.")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, draw_seed = resolve_key(item, 0)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][(index - int(self.offsets[part]), draw_seed)]


def load_sample_image(name: str) -> np.ndarray:
    """One of the photographs bundled with scikit-image, as an RGB ``uint8`` array."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"skimage.data has no image {name!r}; pick one of its bundled colour photos.")
    array = np.asarray(loader())
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


class InMemoryCropDataset(Dataset):
    """Random crops (and flips) of images held in memory (``[H, W, 3]`` uint8 arrays); `repeats` lists
    each image several times per epoch so that tiny runs see several crops."""

    def __init__(self, images: Sequence[np.ndarray], crop_size: int, flip: bool, repeats: int, seed: int):
        self.images = list(images)
        self.crop_size = int(crop_size)
        self.flip = flip
        self.repeats = int(repeats)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, draw_seed = resolve_key(item, self.seed)
        array = self.images[index % len(self.images)]
        return {"hr": to_tensor(random_crop_flip(array, self.crop_size, self.flip, draw_seed))}


class InMemoryPairedDataset(Dataset):
    """Fixed pairs from named in-memory images: centre HR crops and their bicubic LR."""

    def __init__(self, names: Sequence[str], images: Sequence[np.ndarray], crop_size: int, scale: int):
        self.names = list(names)
        degradation = BicubicDegradation(scale)
        self.pairs: list[tuple[Tensor, Tensor]] = []
        for array in images:
            hr_target, lr = degradation(to_tensor(center_crop(array, crop_size))[None])
            self.pairs.append((hr_target[0], lr[0]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        hr, lr = self.pairs[index]
        return {"hr": hr, "lr": lr, "name": self.names[index]}


class SampleDataset(InMemoryCropDataset):
    """Random crops of photographs bundled with scikit-image: a training set that needs no files."""

    def __init__(
        self, names: Sequence[str], crop_size: int, flip: bool = True, repeats: int = 1, seed: int = 0
    ):
        self.names = list(names)
        if not self.names:
            raise ValueError("SampleDataset needs at least one skimage.data image name in `names`.")
        super().__init__([load_sample_image(name) for name in self.names], crop_size, flip, repeats, seed)


class SamplePairedDataset(InMemoryPairedDataset):
    """Fixed validation pairs from bundled photographs: centre HR crops and their bicubic LR."""

    def __init__(self, names: Sequence[str], crop_size: int, scale: int = 4):
        super().__init__(names, [load_sample_image(name) for name in names], crop_size, scale)


# --------------------------------------------------------------------------- evaluation sets --

# Stems that differ only by these endings pair up (RealSR: "Canon_001_HR" / "Canon_001_LR4").
# DIV2K's LR: "0801x4".
PAIR_SUFFIX = re.compile(r"([_-](hr|lr|gt|lq)\d*|[_-]?x\d+)$", re.IGNORECASE)


def pair_key(path: Path) -> str:
    return PAIR_SUFFIX.sub("", path.stem)


def keyed_files(folder: Path) -> dict[str, Path]:
    """Images of `folder` by `pair_key`; two files with one key are an error."""
    files: dict[str, Path] = {}
    for path in list_images(folder, recursive=False):
        key = pair_key(path)
        if key in files:
            raise ValueError(f"{files[key].name} and {path.name} in {folder} pair up with the same partner.")
        files[key] = path
    return files


class PairedFolderDataset(Dataset):
    """Fixed LR/HR pairs from two sub-folders (RealSR, DRealSR, our Table 2 caches).

    Files pair up by stem after dropping an ``_HR``/``_LR4``/``_x4``-style ending, in sorted order of
    that key (never in directory order). Every LR and HR file must have a partner and every HR must be
    exactly `scale` times its LR (after the optional centre crop).

    Args:
        root: dataset folder.
        lr_subdir, hr_subdir: the two sub-folders (StableSR's test sets use ``test_LR``/``test_HR``).
        scale: SR factor.
        lr_crop: centre-crop LR to this size (and HR to ``scale`` times it); None keeps them whole.
    """

    def __init__(
        self,
        root: str | Path,
        lr_subdir: str = "test_LR",
        hr_subdir: str = "test_HR",
        scale: int = 4,
        lr_crop: int | None = None,
    ):
        self.root = Path(root)
        self.scale, self.lr_crop = int(scale), lr_crop
        lr_files, hr_files = keyed_files(self.root / lr_subdir), keyed_files(self.root / hr_subdir)
        if not lr_files or not hr_files:
            raise FileNotFoundError(f"No images in {self.root / lr_subdir} or {self.root / hr_subdir}.")
        unmatched = sorted(set(lr_files) ^ set(hr_files))
        if unmatched:
            raise ValueError(
                f"{len(unmatched)} files under {self.root} have no partner in {lr_subdir}/{hr_subdir} "
                f"(e.g. {unmatched[:3]}); pairs must share a stem up to an _HR/_LR suffix."
            )
        self.keys = sorted(lr_files)
        self.pairs = [(lr_files[k], hr_files[k]) for k in self.keys]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        lr_path, hr_path = self.pairs[index]
        lr, hr = read_rgb(lr_path), read_rgb(hr_path)
        if self.lr_crop is not None:
            lr, hr = center_crop(lr, self.lr_crop), center_crop(hr, self.lr_crop * self.scale)
        if hr.shape[0] != lr.shape[0] * self.scale or hr.shape[1] != lr.shape[1] * self.scale:
            raise ValueError(
                f"{hr_path} is {hr.shape[1]}x{hr.shape[0]} but its LR {lr_path} is "
                f"{lr.shape[1]}x{lr.shape[0]}; expected exactly x{self.scale}."
            )
        return {"hr": to_tensor(hr), "lr": to_tensor(lr), "name": self.keys[index]}


class LRFolderDataset(Dataset):
    """LR images without ground truth (RealLR200): ``{"lr", "name"}``, for no-reference metrics."""

    def __init__(self, root: str | Path, recursive: bool = False):
        self.root = Path(root)
        self.files = list_images(self.root, recursive=recursive)
        if not self.files:
            raise FileNotFoundError(
                f"No images found in {self.root}; point the LR path at a folder of images."
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        return {
            "lr": to_tensor(read_rgb(path)),
            "name": path.relative_to(self.root).with_suffix("").as_posix(),
        }
