"""The four synthetic test cases of the paper's Table 2, built from any HR folder and cached on disk.

Each HR image is centre-cropped to `crop_size` (reflect-padded when smaller), then degraded:

* ``bicubic``: bicubic ×1/4 (antialiased);
* ``blur``: Gaussian blur σ=2, then bicubic ×1/4;
* ``noise``: bicubic ×1/4, then Gaussian noise σ=40 (8-bit levels);
* ``mixture``: blur σ=2, bicubic ×1/4, noise σ=20, JPEG quality 50.

The numbers live in ``conf/data/table2/<case>.yaml``. Noise is drawn from a CPU generator seeded by
``(seed, index of the image in sorted order)``; JPEG is a real libjpeg round trip (Pillow), so the
LR files are bit-identical on every run. A case folder holds ``test_HR/``, ``test_LR/`` and
``manifest.json``; a folder whose manifest matches the request is reused as is.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from addsr_pl.data.datasets import PairedFolderDataset, center_crop
from addsr_pl.data.degradation import bicubic_downscale, blur, quantize_8bit
from addsr_pl.data.io import list_images, read_rgb, to_tensor
from addsr_pl.data.kernels import bivariate_gaussian
from addsr_pl.data.rng import mix_seed
from addsr_pl.paths import config_dir


@dataclass(frozen=True)
class Table2Case:
    """One synthetic degradation: optional Gaussian blur, bicubic ×1/scale, optional noise and JPEG."""

    name: str
    scale: int = 4
    blur_sigma: float | None = None
    blur_kernel_size: int = 21
    noise_sigma: float | None = None
    jpeg_quality: int | None = None

    def degrade(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """LR (``[1, 3, h, w]``, 8-bit levels) from HR ``[1, 3, H, W]`` in float64 on the CPU."""
        x = hr.double()
        if self.blur_sigma is not None:
            sigma = torch.tensor([float(self.blur_sigma)], dtype=torch.float64)
            kernel = bivariate_gaussian(
                self.blur_kernel_size, sigma, sigma, torch.zeros(1, dtype=torch.float64)
            )
            x = blur(x, kernel)
        x = bicubic_downscale(x, self.scale)
        if self.noise_sigma is not None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            x = x + noise * (self.noise_sigma / 255.0)
        x = quantize_8bit(x)
        if self.jpeg_quality is not None:
            x = jpeg_roundtrip(x, self.jpeg_quality)
        return x.float()


def jpeg_roundtrip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode ``[1, 3, h, w]`` 8-bit-level images with libjpeg at `quality`."""
    array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return to_tensor(decoded)[None].to(image.dtype)


def load_table2_case(name: str) -> Table2Case:
    """The case `name` from ``conf/data/table2/<name>.yaml``."""
    path = config_dir() / "data" / "table2" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"Unknown Table 2 case {name!r} (no {path}); known cases: {known}.")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.pop("_target_", None)
    return Table2Case(**values)


def _manifest(case: Table2Case, hr_files: list[Path], seed: int, crop_size: int) -> dict:
    return {
        "case": asdict(case),
        "seed": seed,
        "crop_size": crop_size,
        "hr_files": [p.name for p in hr_files],
    }


def make_table2_case(
    hr_root: str | Path,
    case: str | Table2Case,
    out_root: str | Path,
    seed: int = 0,
    crop_size: int = 512,
) -> Path:
    """Write (or reuse) ``out_root/<case>/{test_HR,test_LR}`` for the HR images in `hr_root`.

    Returns the case folder, readable with `PairedFolderDataset` (or `Table2Dataset`).
    """
    case = load_table2_case(case) if isinstance(case, str) else case
    if crop_size % case.scale:
        raise ValueError(f"crop_size={crop_size} must be a multiple of the case's scale {case.scale}.")
    hr_files = list_images(hr_root, recursive=False)
    if not hr_files:
        raise FileNotFoundError(
            f"No images found in {hr_root}; point hr_root at an HR folder (e.g. DIV2K-val)."
        )
    folder = Path(out_root) / case.name
    manifest = _manifest(case, hr_files, seed, crop_size)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return folder
    (folder / "test_HR").mkdir(parents=True, exist_ok=True)
    (folder / "test_LR").mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(hr_files):
        hr = to_tensor(center_crop(read_rgb(path), crop_size))[None]
        lr = case.degrade(hr, torch.Generator().manual_seed(mix_seed(seed, index)))
        for image, sub in ((hr, "test_HR"), (lr, "test_LR")):
            array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(folder / sub / f"{path.stem}.png")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return folder


class Table2Dataset(PairedFolderDataset):
    """A Table 2 case of `hr_root`, built on first use under `cache_root` and read as fixed pairs."""

    def __init__(
        self, hr_root: str | Path, case: str, cache_root: str | Path, seed: int = 0, crop_size: int = 512
    ):
        loaded = load_table2_case(case)
        folder = make_table2_case(hr_root, loaded, cache_root, seed=seed, crop_size=crop_size)
        super().__init__(folder, "test_LR", "test_HR", scale=loaded.scale)
