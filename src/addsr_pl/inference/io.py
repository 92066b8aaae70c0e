"""Image files in and out, keeping what a photographer expects to get back.

`read_image` gives the network an RGB tensor in [0, 1] and keeps, next to it, everything needed to
write the result faithfully with `write_image`: the alpha channel, the bit depth (8 or 16), whether
the input was grayscale, the ICC profile and the EXIF block (orientation applied on read and reset
to 1 on write).

Decoders: Pillow for everything it reads without loss. Pillow truncates 16-bit colour to 8 bits, so
16-bit colour PNGs are decoded with OpenCV (`cv2`, a dependency of pyiqa) and 16-bit TIFFs with
`tifffile` (a dependency of scikit-image). Encoders: Pillow for 8-bit files; `tifffile` for 16-bit
TIFF; 16-bit PNG with a small encoder below, since Pillow cannot write 16-bit colour and OpenCV can
neither write gray+alpha nor embed an ICC profile or EXIF.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps
from torch import Tensor

# Extensions read from folders (case-insensitive). GIF and PNM are read; results go out as PNG.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".pnm")
# Output formats and the extension each gets when chosen with `format=`.
OUTPUT_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}
_FORMAT_NAMES = {
    "png": "PNG",
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "tif": "TIFF",
    "tiff": "TIFF",
    "webp": "WEBP",
    "bmp": "BMP",
}
ALPHA_FORMATS = frozenset({"PNG", "TIFF", "WEBP"})
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})

_ORIENTATION_TAG = 0x0112  # EXIF Orientation
# ITU-R BT.601 luma, the weights Pillow uses for RGB -> L, so gray output matches a gray conversion.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(Exception):
    """A file that cannot be read as an image; names the file and the reason so a batch can skip it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"Cannot read image {self.path}: {reason}")


@dataclass
class LoadedImage:
    """An image ready for the network plus what `write_image` needs to write the result back.

    rgb: [3, H, W] float32 in [0, 1] (grayscale replicated to three channels), EXIF orientation applied.
    alpha: [1, H, W] float32 in [0, 1], or None.
    bit_depth: 8 or 16 (bits per channel of the file).
    icc_profile / exif: raw bytes to carry to the output (EXIF with orientation reset to 1), or None.
    mode / format: Pillow's mode and format name of the file as stored ("I;16", "P", "CMYK"; "PNG").
    """

    path: Path
    rgb: Tensor
    alpha: Tensor | None
    bit_depth: int
    grayscale: bool
    icc_profile: bytes | None
    exif: bytes | None
    mode: str
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) after orientation."""
        return self.rgb.shape[-2], self.rgb.shape[-1]


# ---------------------------------------------------------------------------------------------- reading


def read_image(path: str | Path, max_pixels: int | None = None) -> LoadedImage:
    """Read an image file; raise `ImageReadError` naming the file and the reason when it cannot.

    `max_pixels` bounds the memory before decoding: the size comes from the file's header (Pillow opens
    lazily), and a file declaring more pixels is refused undecoded, as a decompression bomb (a small
    PNG of one colour can declare 20000 x 20000 pixels, 4.8 GB as float RGB). This check replaces
    Pillow's own for the call (`Image.MAX_IMAGE_PIXELS`, which only warns up to twice its limit, and
    whose limit is not the configured one); with None, Pillow's own check applies as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = None  # `_check_pixels` below, with the configured limit
        with Image.open(path) as image:
            _check_pixels(path, image.size, max_pixels)
            image.load()  # decode now, so truncated or corrupt data fails here and not later
            return _decode(path, image)
    except (ImageReadError, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            path, f"{error} Not decoded: raise limits.max_input_pixels if the file is trusted."
        ) from None
    except Exception as error:  # any decoder failure of an untrusted file is a read error
        raise ImageReadError(path, f"{type(error).__name__}: {error}") from error
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse, before decoding, an image whose declared (width, height) exceeds `max_pixels`."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            path,
            f"declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), above limits.max_input_pixels "
            f"({max_pixels}); not decoded (a decompression bomb?). Raise the limit in conf/upscale.yaml if the "
            "file is trusted and memory allows.",
        )


def _decode(path: Path, image: Image.Image) -> LoadedImage:
    exif = image.getexif()
    orientation = int(exif.get(_ORIENTATION_TAG, 1))
    icc = image.info.get("icc_profile") or None
    fmt = image.format or "PNG"
    high = _read_high_bit_depth(path, image)
    if high is not None:
        pixels, grayscale = high
        pixels = _orient(pixels, orientation)
        channels = torch.from_numpy(pixels.astype(np.float32) / 65535.0).permute(2, 0, 1)
        color = channels[:1] if grayscale else channels[:3]
        alpha = channels[-1:].clone() if channels.shape[0] in (2, 4) else None
        rgb = color.expand(3, -1, -1).clone() if grayscale else color.contiguous()
        return LoadedImage(path, rgb, alpha, 16, grayscale, icc, _exif_bytes(exif, fmt), image.mode, fmt)

    mode = image.mode
    oriented = ImageOps.exif_transpose(image)
    rgb, alpha, bit_depth, grayscale, icc = _from_pillow(path, oriented, icc)
    return LoadedImage(path, rgb, alpha, bit_depth, grayscale, icc, _exif_bytes(exif, fmt), mode, fmt)


def _from_pillow(
    path: Path, image: Image.Image, icc: bytes | None
) -> tuple[Tensor, Tensor | None, int, bool, bytes | None]:
    """Pillow image -> (rgb, alpha, bit depth, grayscale, ICC profile valid for the RGB/gray data)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageReadError(path, f"32-bit integer pixels outside the 16-bit range (mode {mode})")
        gray = torch.from_numpy((values / 65535.0).astype(np.float32))[None]
        return gray.expand(3, -1, -1).clone(), None, 16, True, icc
    if mode == "F":
        raise ImageReadError(path, "32-bit float images are not supported; convert to 16-bit PNG or TIFF")
    if mode == "CMYK":
        image, icc = _cmyk_to_rgb(image, icc)
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        try:
            image = image.convert("RGB")  # RGBX, YCbCr, LAB, HSV
        except ValueError as error:
            raise ImageReadError(path, f"unsupported pixel mode {mode}") from error
    pixels = np.asarray(image).astype(np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = torch.from_numpy(pixels).permute(2, 0, 1)
    grayscale = image.mode in ("L", "LA")
    alpha = channels[-1:].contiguous() if image.mode in ("LA", "RGBA") else None
    rgb = channels[:1].expand(3, -1, -1).clone() if grayscale else channels[:3].contiguous()
    return rgb, alpha, 8, grayscale, icc


def _cmyk_to_rgb(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """CMYK -> sRGB through the embedded profile when there is one (the output then carries sRGB)."""
    if icc is None:
        return image.convert("RGB"), None
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    source = ImageCms.ImageCmsProfile(BytesIO(icc))
    converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
    return converted, srgb.tobytes()


def _read_high_bit_depth(path: Path, image: Image.Image) -> tuple[np.ndarray, bool] | None:
    """16-bit colour PNG or 16-bit TIFF as an [H, W, C] uint16 array (C = 1..4) and a grayscale flag;
    None where Pillow decodes the file without loss. Its size was checked (`read_image`) from the same
    header (PNG's IHDR, the TIFF's first page) that OpenCV and tifffile decode."""
    if image.format == "PNG":
        with path.open("rb") as handle:
            header = handle.read(26)  # signature + IHDR: bit depth at 24, colour type at 25
        bit_depth, color_type = header[24], header[25]
        if bit_depth != 16 or color_type == 0:  # 16-bit gray is Pillow's "I;16", read there
            return None
        import cv2  # a pyiqa dependency; only needed for 16-bit colour PNG

        data = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if data is None or data.dtype != np.uint16:
            raise ImageReadError(path, "OpenCV could not decode this 16-bit PNG")
        if data.ndim == 2:
            data = data[..., None]
        if color_type == 4:  # gray + alpha comes back as BGRA with equal colour channels
            return np.stack([data[..., 0], data[..., 3]], axis=-1), True
        order = [2, 1, 0, 3] if data.shape[-1] == 4 else [2, 1, 0]
        return data[..., order], False
    if image.format == "TIFF" and 16 in _as_tuple(image.tag_v2.get(258, 8)):
        return _read_tiff16(path)
    return None


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _read_tiff16(path: Path) -> tuple[np.ndarray, bool]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        data = page.asarray()
        axes, photometric = page.axes, int(page.photometric)
        extrasamples = tuple(int(e) for e in page.extrasamples)
    if data.dtype != np.uint16:
        raise ImageReadError(path, f"16-bit TIFF with unsupported sample type {data.dtype}")
    if axes.startswith("S"):  # planar storage: samples first
        data = np.moveaxis(data, 0, -1)
    if data.ndim == 2:
        data = data[..., None]
    if photometric not in (0, 1, 2):
        raise ImageReadError(
            path, f"16-bit TIFF photometric {photometric} is not supported (gray and RGB are)"
        )
    grayscale = photometric in (0, 1)
    color = 1 if grayscale else 3
    data = data[..., : color + (1 if extrasamples else 0)]
    if photometric == 0:  # min-is-white
        data = np.concatenate([65535 - data[..., :1], data[..., 1:]], axis=-1)
    if extrasamples and extrasamples[0] == 1:  # associated (premultiplied) alpha -> straight alpha
        alpha = data[..., -1:].astype(np.float64)
        straight = np.where(alpha > 0, data[..., :-1] * 65535.0 / np.maximum(alpha, 1), 0)
        data = np.concatenate([np.clip(np.round(straight), 0, 65535), alpha], axis=-1).astype(np.uint16)
    return data, grayscale


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF orientation transform of `PIL.ImageOps.exif_transpose`, on an [H, W, C] array."""
    if orientation == 2:
        pixels = pixels[:, ::-1]
    elif orientation == 3:
        pixels = pixels[::-1, ::-1]
    elif orientation == 4:
        pixels = pixels[::-1]
    elif orientation == 5:
        pixels = pixels.transpose(1, 0, 2)
    elif orientation == 6:
        pixels = np.rot90(pixels, k=-1)
    elif orientation == 7:
        pixels = pixels.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        pixels = np.rot90(pixels, k=1)
    return np.ascontiguousarray(pixels)


def _exif_bytes(exif: Image.Exif, fmt: str) -> bytes | None:
    """The EXIF block with orientation reset to 1; TIFF tags describe the file layout, not EXIF: dropped."""
    if fmt == "TIFF" or len(exif) == 0:
        return None
    if _ORIENTATION_TAG in exif:
        exif[_ORIENTATION_TAG] = 1
    return exif.tobytes()


# ---------------------------------------------------------------------------------------------- writing


def output_format(path: str | Path, format: str | None = None) -> str:
    """Pillow's format name ("PNG", "JPEG", ...) from `format` (e.g. "jpg") or else the path's extension."""
    key = (format or Path(path).suffix).lower().lstrip(".")
    if key not in _FORMAT_NAMES:
        raise ValueError(
            f"Cannot write format {key or '(none)'!r} for {path}; choose one of {sorted(_FORMAT_NAMES)}"
        )
    return _FORMAT_NAMES[key]


def write_image(
    path: str | Path,
    rgb: Tensor,
    like: LoadedImage | None = None,
    alpha: Tensor | None = None,
    format: str | None = None,
    quality: int = 95,
) -> Path:
    """Write `rgb` [3, H, W] in [0, 1] (clamped) the way `like` was stored; return the path written.

    - grayscale in -> grayscale out (BT.601 luma of `rgb`); WebP has no gray mode and gets RGB.
    - 16-bit in -> 16-bit out where the format holds it (PNG, TIFF); JPEG/WebP/BMP are 8-bit.
    - alpha [1, H, W] is attached (RGBA/LA). A format without alpha (JPEG, BMP) would drop it, so the
      file is written as PNG next to the requested name instead, with a warning.
    - the ICC profile of `like` is embedded where the format allows it and its colour space matches
      the output (a gray profile is not attached to RGB data); EXIF is carried with orientation 1.
    `quality` is the JPEG/WebP quality.
    """
    path = Path(path)
    fmt = output_format(path, format)
    if alpha is not None and fmt not in ALPHA_FORMATS:
        fallback = path.with_suffix(".png")
        warnings.warn(
            f"{fmt} cannot hold the alpha channel of {path.name}; writing {fallback.name} (PNG) instead",
            stacklevel=2,
        )
        path, fmt = fallback, "PNG"
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"write_image expects rgb shaped [3, H, W], got {tuple(rgb.shape)}")
    bit_depth = like.bit_depth if like is not None and fmt in SIXTEEN_BIT_FORMATS else 8
    if like is not None and like.bit_depth == 16 and bit_depth == 8:
        warnings.warn(
            f"{path.name}: the 16-bit input is written as 8-bit {fmt}; write PNG or TIFF to keep 16 bits",
            stacklevel=2,
        )
    grayscale = like is not None and like.grayscale and fmt != "WEBP"

    color = rgb.detach().float().cpu().clamp(0, 1)
    if grayscale:
        weights = torch.tensor(_LUMA_WEIGHTS).view(3, 1, 1)
        color = (color * weights).sum(0, keepdim=True)
    planes = [color]
    if alpha is not None:
        alpha = alpha.detach().float().cpu().clamp(0, 1).reshape(1, *alpha.shape[-2:])
        if alpha.shape[-2:] != color.shape[-2:]:
            raise ValueError(f"alpha {tuple(alpha.shape[-2:])} and rgb {tuple(color.shape[-2:])} differ")
        planes.append(alpha)
    maximum = 65535 if bit_depth == 16 else 255
    pixels = torch.cat(planes).permute(1, 2, 0).numpy()
    pixels = np.round(pixels * maximum).astype(np.uint16 if bit_depth == 16 else np.uint8)

    icc = like.icc_profile if like is not None else None
    icc = icc if icc is not None and _icc_matches(icc, grayscale) else None
    exif = like.exif if like is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    if bit_depth == 16 and fmt == "PNG":
        path.write_bytes(encode_png16(pixels, icc_profile=icc, exif=exif))
    elif bit_depth == 16:
        _write_tiff16(path, pixels, grayscale, icc)
    else:
        _write_pillow(path, fmt, pixels, icc, exif, quality)
    return path


def _icc_matches(icc: bytes, grayscale: bool) -> bool:
    """Whether the profile's data colour space (ICC header bytes 16-20) fits the written pixels."""
    space = icc[16:20]
    return space == (b"GRAY" if grayscale else b"RGB ")


def _write_pillow(
    path: Path, fmt: str, pixels: np.ndarray, icc: bytes | None, exif: bytes | None, quality: int
) -> None:
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    options: dict = {}
    if fmt in ("PNG", "JPEG", "WEBP", "TIFF") and icc is not None:
        options["icc_profile"] = icc
    if fmt in ("PNG", "JPEG", "WEBP") and exif is not None:
        options["exif"] = exif
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = quality
    if fmt == "TIFF":
        options["compression"] = "tiff_deflate"
    image.save(path, format=fmt, **options)


def _write_tiff16(path: Path, pixels: np.ndarray, grayscale: bool, icc: bytes | None) -> None:
    import tifffile  # a scikit-image dependency

    has_alpha = pixels.shape[-1] in (2, 4)
    tifffile.imwrite(
        path,
        pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
        photometric="minisblack" if grayscale else "rgb",
        planarconfig="contig",
        extrasamples=("unassalpha",) if has_alpha else None,
        iccprofile=icc,
        compression="zlib",
    )


def encode_png16(pixels: np.ndarray, icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """A 16-bit PNG of an [H, W, C] uint16 array (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA).

    Rows use the Paeth filter; `icc_profile` goes into an iCCP chunk and `exif` into an eXIf chunk.
    """
    height, width, channels = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = np.ascontiguousarray(pixels.astype(">u2")).view(np.uint8).reshape(height, width * channels * 2)
    filtered = _paeth_filter(raw, bytes_per_pixel=channels * 2)
    scanlines = np.concatenate([np.full((height, 1), 4, np.uint8), filtered], axis=1)

    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))]
    if icc_profile is not None:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    if exif is not None:
        chunks.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)))
    chunks.append(_png_chunk(b"IEND", b""))
    return _PNG_SIGNATURE + b"".join(chunks)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth_filter(raw: np.ndarray, bytes_per_pixel: int) -> np.ndarray:
    """PNG filter type 4 for all rows at once: each byte minus the Paeth predictor of its raw neighbours."""
    raw16 = raw.astype(np.int16)
    left = np.zeros_like(raw16)
    left[:, bytes_per_pixel:] = raw16[:, :-bytes_per_pixel]
    up = np.zeros_like(raw16)
    up[1:] = raw16[:-1]
    up_left = np.zeros_like(raw16)
    up_left[1:, bytes_per_pixel:] = raw16[:-1, :-bytes_per_pixel]
    estimate = left + up - up_left
    dist_left, dist_up, dist_up_left = (
        np.abs(estimate - left),
        np.abs(estimate - up),
        np.abs(estimate - up_left),
    )
    predictor = np.where(
        (dist_left <= dist_up) & (dist_left <= dist_up_left),
        left,
        np.where(dist_up <= dist_up_left, up, up_left),
    )
    return ((raw16 - predictor) % 256).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- alpha


def upscale_alpha(alpha: Tensor, size: tuple[int, int]) -> Tensor:
    """Alpha [..., h, w] resized to `size` (H, W) with bicubic interpolation, clamped to [0, 1].

    A constant alpha (fully opaque images saved as RGBA, say) is passed through exactly.
    """
    lead = alpha.shape[:-2]
    if torch.all(alpha == alpha.reshape(-1)[0]):
        return torch.full((*lead, *size), float(alpha.reshape(-1)[0]), dtype=alpha.dtype, device=alpha.device)
    flat = alpha.reshape(-1, 1, *alpha.shape[-2:]).float()
    resized = F.interpolate(flat, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return resized.reshape(*lead, *size).to(alpha.dtype)


# ---------------------------------------------------------------------------------------------- folders


def list_images(
    root: str | Path,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    exclude: str | Path | None = None,
) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path; `root` may also be one file.

    Extensions match case-insensitively. Hidden files and folders (".name", e.g. macOS "._x.png"
    resource forks) are skipped, and so is the folder `exclude` (an output folder inside the input).
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"Input {root} is neither an image file nor a folder")
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if path.suffix.lower() in wanted:
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def output_path(
    source: str | Path,
    input_root: str | Path,
    output_root: str | Path,
    *,
    suffix: str = "",
    format: str | None = None,
) -> Path:
    """Where the result of `source` goes: the same relative path under `output_root`, the stem plus
    `suffix` (taken literally, e.g. "_x4"), and the extension of `format` or else the source's own
    (formats that are not written, GIF or PNM, become PNG)."""
    source, input_root = Path(source), Path(input_root)
    relative = (
        Path(source.name) if input_root.is_file() or input_root == source else source.relative_to(input_root)
    )
    if format is not None:
        extension = OUTPUT_EXTENSIONS[output_format(source, format)]
    elif source.suffix.lower().lstrip(".") in _FORMAT_NAMES:
        extension = source.suffix
    else:
        extension = OUTPUT_EXTENSIONS["PNG"]
    return Path(output_root) / relative.with_name(f"{relative.stem}{suffix}{extension}")


def plan_outputs(
    sources: Iterable[str | Path],
    input_root: str | Path,
    output_root: str | Path,
    *,
    suffix: str = "",
    format: str | None = None,
) -> list[tuple[Path, Path]]:
    """(source, output) pairs mirroring the input tree; refuses plans that overwrite an input or write
    two inputs to one file (e.g. "a.jpg" and "a.png" with format="png")."""
    sources = [Path(s) for s in sources]
    inputs = {s.resolve() for s in sources}
    pairs, taken = [], {}
    for source in sources:
        target = output_path(source, input_root, output_root, suffix=suffix, format=format)
        if target.resolve() in inputs:
            raise ValueError(
                f"The output for {source} would overwrite the input {target}; "
                "choose another output folder or a suffix"
            )
        key = target.resolve()
        if key in taken:
            raise ValueError(
                f"{taken[key]} and {source} would both be written to {target}; use a suffix or keep formats"
            )
        taken[key] = source
        pairs.append((source, target))
    return pairs
