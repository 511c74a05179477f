"""Reading image files safely and turning them into model inputs.

Preprocessing, in this order (documented in the README):

1. Decode with Pillow. Only the first frame of animated or multi-page files is used.
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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cdi.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
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


def open_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` fully (first frame) and return it in its own mode.

    Raises the :class:`~cdi.errors.ImageError` subclass that names what is wrong.
    """
    if not data:
        raise EmptyImageError(name, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit: make both an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecompressionBombError(
                    name, f"{width}×{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
    except UnidentifiedImageError:
        raise NotAnImageError(name, "not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(name, f"decompression bomb: {exc}") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
            raise TruncatedImageError(name, f"the file is truncated ({msg})") from None
        raise CorruptImageError(name, f"the file is corrupt ({msg})") from None
    except (ValueError, SyntaxError, EOFError, struct_error()) as exc:
        raise CorruptImageError(name, f"the file is corrupt ({exc})") from None
    if width <= 0 or height <= 0:
        raise CorruptImageError(name, "the image has no pixels")
    return img


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring every mode Pillow decodes into L, LA, RGB or RGBA, 8 bits per channel."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode in ("I", "F") and arr.max() <= 255.0 and arr.min() >= 0.0:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0.0, 255.0)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode == "PA":
        return img.convert("RGBA")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    return img.convert("RGBA")


def to_model_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """The model input for one decoded image: float32 ``[channels, size, size]`` in [-1, 1]."""
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} image channels are not supported")
    img = ImageOps.exif_transpose(img) or img
    img = _to_8bit(img)
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


def load_model_input(
    file: ImageFile, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and preprocess one file; raises :class:`~cdi.errors.ImageError` on bad input."""
    return to_model_array(open_image(file.data, file.name, max_pixels), size, channels)


def list_image_files(directory: str | Path) -> list[Path]:
    """The image files directly inside ``directory`` (by suffix), sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory")
    return sorted(
        p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
