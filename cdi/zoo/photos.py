"""An RGB image source for shipped models: tiles of scikit-learn's two sample photographs.

``sklearn.datasets.load_sample_image`` ships two 427×640 JPEG photographs (``china.jpg``, a
temple; ``flower.jpg``, a flower). Each is cut into a grid of non-overlapping 16×16 tiles
(26 rows × 40 columns, the grid centred vertically), 2,080 tiles in all: photographs of
texture, sky, foliage and edges that ship inside scikit-learn, so a model trained on them
and its member / held-out tiles can be rebuilt anywhere without a download. No two tiles
share a pixel, so a held-out tile never contains part of a member. An image is identified
by its tile index: photo-major, then row-major.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image

PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")
TILE = 16
#: The file-name prefix of exported tiles; the channels of every image.
PREFIX = "tile"
CHANNELS = 3


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_image

    return tuple(np.ascontiguousarray(load_sample_image(name), dtype=np.uint8) for name in PHOTOS)


def _grid(photo: np.ndarray) -> tuple[int, int, int]:
    """(rows, columns, first row's offset) of the tile grid of one photograph."""
    h, w = photo.shape[:2]
    rows, cols = h // TILE, w // TILE
    return rows, cols, (h - rows * TILE) // 2


def _per_photo() -> list[int]:
    return [r * c for r, c, _ in (_grid(p) for p in _photos())]


def count() -> int:
    return sum(_per_photo())


def _locate(index: int) -> tuple[int, int, int]:
    """(photo, top, left) of tile ``index``."""
    if not 0 <= index < count():
        raise IndexError(f"tile {index} is outside 0…{count() - 1}")
    for p, n in enumerate(_per_photo()):
        if index < n:
            _, cols, offset = _grid(_photos()[p])
            return p, offset + (index // cols) * TILE, (index % cols) * TILE
        index -= n
    raise AssertionError("unreachable")


def label(index: int) -> int:
    """The photograph (0: china.jpg, 1: flower.jpg) tile ``index`` was cut from."""
    return _locate(index)[0]


def box(index: int) -> tuple[int, int, int, int]:
    """(photo, top, left, side) of tile ``index`` in its photograph's pixels."""
    p, top, left = _locate(index)
    return p, top, left, TILE


def image(index: int, size: int = TILE) -> Image.Image:
    """Tile ``index`` as an 8-bit RGB image of ``size``×``size`` pixels (bicubic if resized)."""
    p, top, left = _locate(index)
    tile = Image.fromarray(_photos()[p][top : top + TILE, left : left + TILE])
    return tile if size == TILE else tile.resize((size, size), Image.Resampling.BICUBIC)


def fingerprint() -> str:
    """SHA-256 of the decoded photographs: changes if the source pixels ever change."""
    h = hashlib.sha256()
    for name, photo in zip(PHOTOS, _photos(), strict=True):
        h.update(f"{name}\0{photo.shape}\0".encode())
        h.update(photo.tobytes())
    return h.hexdigest()
