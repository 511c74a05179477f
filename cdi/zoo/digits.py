"""The image source of the shipped test models: scikit-learn's handwritten digits.

The 1,797 digits (8×8, 17 grey levels) ship inside scikit-learn, so the models trained on
them and the member / held-out images of their manifests can be rebuilt anywhere without
a download. An image is identified by its index in ``sklearn.datasets.load_digits()``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

#: The file-name prefix of exported digits; the channels of every image.
PREFIX = "digit"
CHANNELS = 1


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def count() -> int:
    return int(_digits()[0].shape[0])


def label(index: int) -> int:
    """The digit (0–9) shown by image ``index``: the class of class-conditional models."""
    return int(_digits()[1][index])


def image(index: int, size: int = 32) -> Image.Image:
    """Digit ``index`` as an 8-bit grey image of ``size``×``size`` pixels, white on black.

    The 8×8 original (levels 0–16) is scaled to 0–255 and upscaled with bicubic resampling.
    """
    pixels = _digits()[0][index] / 16.0 * 255.0
    small = Image.fromarray(np.round(pixels).astype(np.uint8), mode="L")
    return small.resize((size, size), Image.Resampling.BICUBIC)
