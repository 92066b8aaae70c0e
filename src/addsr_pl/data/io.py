"""Reading training images of any common layout into RGB arrays.

Every image becomes an ``H x W x 3`` array: ``uint8`` for 8-bit sources and ``uint16`` for 16-bit
ones, so 16-bit precision survives until the conversion to float. Conversions are explicit:

* grayscale (``1``, ``L``, ``I;16``, ``I``) is replicated to three channels;
* palette (``P``) is expanded through its palette;
* CMYK and YCbCr go through Pillow's conversion to RGB;
* alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is composited over white, which is how
  viewers show a transparent image, so that undefined colours under alpha 0 never reach training;
* EXIF orientation is applied, so the pixels are upright as the photographer saw them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Pillow raises these on unreadable, truncated or unsupported files.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, cv2.error)


class ImageReadError(OSError):
    """An image file that cannot be decoded into RGB."""


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite an ``H x W x 4`` array over white, keeping its integer dtype."""
    full = float(np.iinfo(rgba.dtype).max)
    rgb = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:].astype(np.float64) / full
    out = rgb * alpha + full * (1.0 - alpha)
    return np.clip(np.rint(out), 0, full).astype(rgba.dtype)


def _is_16bit_colour(image: Image.Image) -> bool:
    """Pillow decodes 16-bit-per-channel RGB(A) PNG/TIFF to 8 bits; its raw mode still says 16."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    for tile in image.tile:
        rawmode = tile[3][0] if isinstance(tile[3], tuple) else tile[3]
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _read_16bit_colour(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3 or array.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{path}: a 16-bit colour image that OpenCV cannot decode")
    if array.shape[2] == 4:
        return _composite_on_white(cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA))
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding its pixels; None if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except READ_ERRORS:
        return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` ``uint8`` or ``uint16`` RGB array.

    Raises `ImageReadError` naming the file for anything that cannot be decoded completely
    (unknown format, garbage bytes, truncated data).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if _is_16bit_colour(image):
                array = _read_16bit_colour(path)
                return np.ascontiguousarray(array)
            image.load()  # decodes everything now, so truncated files fail here
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                gray = np.asarray(image)
                if gray.min() < 0 or gray.max() > 65535:
                    raise ImageReadError(f"{path}: integer image outside the 16-bit range")
                return np.repeat(gray.astype(np.uint16)[..., None], 3, axis=2)
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                image.mode == "P" and "transparency" in image.info
            )
            if has_alpha:
                return _composite_on_white(np.asarray(image.convert("RGBA")))
            if image.mode == "F":
                raise ImageReadError(f"{path}: floating-point images are not supported; save as 8/16-bit")
            return np.asarray(image.convert("RGB")).copy()
    except ImageReadError:
        raise
    except READ_ERRORS as error:
        raise ImageReadError(f"{path}: {type(error).__name__}: {error}") from error


def to_tensor(array: np.ndarray) -> Tensor:
    """``H x W x 3`` integer RGB array to a ``3 x H x W`` float32 tensor in [0, 1]."""
    full = float(np.iinfo(array.dtype).max)
    return torch.from_numpy(np.ascontiguousarray(array).transpose(2, 0, 1).astype(np.float32) / full)


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under `root`, sorted by their path relative to `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image folder {root} does not exist (or is not a folder); fix the data path."
        )
    pattern = "**/*" if recursive else "*"
    files = [p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
