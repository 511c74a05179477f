"""Reading image files safely and turning them into model inputs.

Preprocessing, in this order (documented in the README):

1. Decode with Pillow. Only the first frame of animated or multi-page files is used. EPS is
   refused (Pillow decodes it by running Ghostscript).
2. Apply the EXIF orientation tag, so the pixels are as a viewer shows them.
3. Convert the colour mode: 16-bit and 32-bit grey are scaled to 8 bits by their full range
   (65535 or the image's maximum), palette images are expanded, CMYK and YCbCr become RGB,
   and images with transparency are composited onto white.
4. Convert to the model's channels: luminance (ITU-R 601-2) for one-channel models, RGB
   (grey replicated) for three-channel ones.
5. Centre-crop to a square on the shorter side, then resize to the model's resolution with
   bicubic resampling.
6. Scale 0…255 to [-1, 1] as float32, channels first.

Every failure raises a subclass of :class:`cdi.errors.ImageError` naming the file; it
never concerns other images.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from cdi.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    NotAnImageError,
    TruncatedImageError,
)

#: Largest image accepted, in pixels (width × height). Pillow's own limit is 89.5 M; a
#: membership audit never needs more than this, and it bounds a worker's memory.
DEFAULT_MAX_PIXELS = 40_000_000

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp"}
)


@dataclass(frozen=True)
class ImageFile:
    """An image's bytes as given, with its name and SHA-256."""

    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> ImageFile:
        p = Path(path)
        return cls(name=name or p.name, data=p.read_bytes())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Pixel modes :func:`open_image` returns (every mode Pillow decodes JPEG, PNG, WebP, GIF, TIFF
#: and BMP into); :func:`_to_8bit` converts each of them.
SUPPORTED_MODES = frozenset({
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
    "I", "F", "I;16", "I;16L", "I;16B", "I;16N",
})

#: Formats refused even though Pillow reads them: decoding EPS runs Ghostscript, an external
#: interpreter of untrusted PostScript.
REFUSED_FORMATS = frozenset({"EPS"})


def open_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` fully (first frame) and return it in its own mode.

    Raises the :class:`~cdi.errors.ImageError` subclass that names what is wrong, and no
    other exception, whatever the bytes.
    """
    if not data:
        raise EmptyImageError(name, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit: make both an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Opening reads the header only (the first frame is current); nothing is
            # decoded, so the size is checked before any pixel memory is allocated.
            img = Image.open(io.BytesIO(data))
            _check_size(img, name, max_pixels)
            if img.format in REFUSED_FORMATS:
                raise NotAnImageError(name, f"{img.format} files are not accepted")
            img.load()
            _check_size(img, name, max_pixels)
    except Exception as exc:  # whatever a decoder raises on hostile bytes
        raise _decode_error(name, data, exc) from None
    if img.mode not in SUPPORTED_MODES:
        raise NotAnImageError(name, f"unsupported pixel mode {img.mode}")
    return img


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _signature(data: bytes) -> str | None:
    """The format whose magic bytes ``data`` starts with (formats with a distinctive one)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _riff_truncated(data: bytes) -> bool:
    """A RIFF (WebP) file shorter than its header says: Pillow only reports a failed decoder."""
    return data[:4] == b"RIFF" and len(data) >= 8 and len(data) < 8 + int.from_bytes(data[4:8], "little")


def _decode_error(name: str, data: bytes, exc: Exception) -> ImageError:
    """The :class:`~cdi.errors.ImageError` for what decoding ``data`` raised."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DecompressionBombError(name, f"decompression bomb: {exc}")
    if isinstance(exc, MemoryError):
        return DecompressionBombError(name, "not enough memory to decode the image")
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        fmt = _signature(data)
        if fmt is None:
            return NotAnImageError(name, "not an image file Pillow can read")
        if _riff_truncated(data):
            return TruncatedImageError(name, f"the {fmt} file is truncated")
        return CorruptImageError(name, f"a {fmt} file whose header is damaged or incomplete")
    lower = msg.lower()
    truncated = isinstance(exc, EOFError) or any(
        s in lower for s in ("truncated", "broken data stream", "premature end", "not enough data")
    )
    if truncated or _riff_truncated(data):
        return TruncatedImageError(name, f"the file is truncated ({msg})")
    if isinstance(exc, (OSError, ValueError, SyntaxError, struct.error, TypeError, IndexError, KeyError)):
        return CorruptImageError(name, f"the file is corrupt ({msg})")
    return CorruptImageError(name, f"the file is corrupt ({type(exc).__name__}: {msg})")


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise CorruptImageError(name, "the image has no pixels")
    if width * height > max_pixels:
        raise DecompressionBombError(
            name, f"{width}×{height} pixels exceeds the limit of {max_pixels} pixels"
        )


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring every mode Pillow decodes into L, LA, RGB or RGBA, 8 bits per channel."""
    mode = img.mode
    if mode in ("L", "RGB"):
        # A PNG tRNS colour key (or a GIF-like transparent grey) makes some pixels transparent.
        if img.info.get("transparency") is not None:
            return img.convert("LA" if mode == "L" else "RGBA")
        return img
    if mode in ("LA", "RGBA"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.where(np.isfinite(arr), arr, 0.0)  # NaN/inf in float images
        if mode.startswith("I;16") or (mode == "I" and img.format == "PNG"):  # PNG has no 32-bit grey
            top = 65535.0
        elif mode == "I" and arr.min() >= 0.0 and arr.max() <= 255.0:
            top = 255.0  # 8-bit values held in a 32-bit image
        else:
            top = max(float(arr.max()), 1.0)  # floats in [0, 1] span the full range
        arr = np.clip(arr / top * 255.0, 0.0, 255.0)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        transparent = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        return img.convert("RGBA" if transparent else "RGB")
    if mode == "La":
        return img.convert("LA")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    return img.convert("RGBA")


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transposition the EXIF (or XMP) orientation asks for; None if none or unreadable."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # damaged metadata: show the pixels as stored, as viewers do
        return None
    return _TRANSPOSE.get(value) if isinstance(value, int) else None


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of a decoded image as shown, after its EXIF orientation."""
    width, height = img.size
    if _orientation(img) in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270,
                             Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE):
        width, height = height, width
    return height, width


def to_model_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """The model input for one decoded image: float32 ``[channels, size, size]`` in [-1, 1]."""
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} image channels are not supported")
    # The orientation is read from the decoded image; the mode conversion is per pixel, so
    # transposing its (smaller, 8-bit) result is the same as transposing first.
    method = _orientation(img)
    img = _to_8bit(img)
    if method is not None:
        img = img.transpose(method)
    if img.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr / 127.5 - 1.0, dtype=np.float32)


def list_image_files(directory: str | Path) -> list[Path]:
    """The image files directly inside ``directory`` (by suffix), sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory")
    return sorted(
        p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
