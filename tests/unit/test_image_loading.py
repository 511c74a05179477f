"""Image decoding and preprocessing: every format and mode, and every kind of bad file."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cdi.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    NotAnImageError,
    TruncatedImageError,
)
from cdi.features import FeatureExtractor
from cdi.images import ImageFile, load_model_input, open_image, to_model_array


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient_rgb(w: int = 40, h: int = 30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@pytest.mark.parametrize("fmt,mode", [
    ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "1"),
    ("PNG", "I;16"), ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("WEBP", "RGB"),
    ("WEBP", "RGBA"), ("GIF", "P"), ("TIFF", "RGB"), ("TIFF", "I;16"), ("TIFF", "CMYK"),
    ("TIFF", "I"), ("BMP", "RGB"), ("BMP", "L"),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_formats_and_modes_load(fmt, mode, channels):
    img = gradient_rgb()
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.int32), "I")
    else:
        img = img.convert(mode)
    data = encode(img, fmt)
    x = load_model_input(ImageFile(f"x.{fmt.lower()}", data), 16, channels)
    assert x.shape == (channels, 16, 16) and x.dtype == np.float32
    assert -1.0 <= x.min() <= x.max() <= 1.0
    assert x.std() > 0.01  # the gradient survived the conversion


def test_sixteen_bit_white_and_black():
    white = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    black = Image.fromarray(np.zeros((8, 8), dtype=np.uint16))
    assert np.allclose(to_model_array(white, 8, 1), 1.0)
    assert np.allclose(to_model_array(black, 8, 1), -1.0)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.allclose(to_model_array(img, 8, 3), 1.0)


def test_cmyk_matches_pillows_rgb_conversion():
    img = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    expected = np.asarray(img.convert("RGB"), dtype=np.float32)[0, 0] / 127.5 - 1
    assert np.allclose(to_model_array(img, 8, 3)[:, 0, 0], expected)


def test_one_channel_models_get_luminance():
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    lum = np.asarray(img.convert("L"), dtype=np.float32)[0, 0] / 127.5 - 1
    assert np.allclose(to_model_array(img, 8, 1), lum)


def test_centre_crop_keeps_the_centre():
    img = Image.new("L", (30, 10), 0)
    img.paste(255, (10, 0, 20, 10))  # the centre square is white, the sides black
    assert np.allclose(to_model_array(img, 10, 1), 1.0)


def test_exif_orientation_is_applied():
    img = Image.new("L", (20, 10), 0)
    img.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    data = encode(img, "JPEG", exif=exif, quality=95)
    shown = open_image(data, "r.jpg")
    x = to_model_array(shown, 10, 1)
    # After rotation the image is 10×20 (portrait); its centre square straddles both halves,
    # with the white half on top.
    assert x[0, :3].mean() > 0.5 and x[0, -3:].mean() < -0.5


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("L", (8, 8), v) for v in (255, 0)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert np.allclose(to_model_array(open_image(buf.getvalue(), "a.gif"), 8, 1), 1.0)


def _claims_size(width: int, height: int) -> bytes:
    """A real small grey PNG whose header (with a valid checksum) claims another size."""
    data = bytearray(encode(Image.new("L", (4, 4), 0), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize("data,error", [
    (b"", EmptyImageError),
    (b"just some text, not an image\n", NotAnImageError),
    (b"PK\x03\x04" + b"\x00" * 40, NotAnImageError),
    (_claims_size(100_000, 100_000), DecompressionBombError),
])
def test_bad_files_raise_typed_errors_naming_the_file(data, error):
    with pytest.raises(error, match=r"bad\.png"):
        open_image(data, "bad.png")


def test_truncated_files():
    png = encode(gradient_rgb(64, 64), "PNG")
    jpeg = encode(gradient_rgb(64, 64), "JPEG")
    with pytest.raises(TruncatedImageError, match="t.png"):
        open_image(png[: len(png) // 2], "t.png")
    with pytest.raises((TruncatedImageError, CorruptImageError), match="t.jpg"):
        open_image(jpeg[: len(jpeg) // 2], "t.jpg")


def test_pixel_limit_is_configurable():
    data = encode(gradient_rgb(40, 30), "PNG")
    with pytest.raises(DecompressionBombError, match="limit"):
        open_image(data, "big.png", max_pixels=1000)


def test_damaged_files_only_ever_raise_image_errors():
    rng = np.random.default_rng(0)
    originals = [encode(gradient_rgb(), f) for f in ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")]
    for data in originals:
        for cut in np.linspace(1, len(data) - 1, 12).astype(int):
            with contextlib.suppress(ImageError):
                open_image(data[:cut], "x")
        for _ in range(20):
            damaged = bytearray(data)
            for pos in rng.integers(0, len(data), 4):
                damaged[pos] ^= int(rng.integers(1, 256))
            with contextlib.suppress(ImageError):
                to_model_array(open_image(bytes(damaged), "x"), 8, 3)


def test_bad_files_do_not_take_the_batch_down(tiny_model_dirs):
    from cdi.models import load_model

    adapter = load_model(str(tiny_model_dirs["pixel"]))
    good = [ImageFile(f"g{i}.png", encode(gradient_rgb(20 + i, 20), "PNG")) for i in range(3)]
    bad = [ImageFile("empty.png", b""), ImageFile("text.png", b"hello"),
           ImageFile("cut.png", good[0].data[:60])]
    result = FeatureExtractor(adapter, batch_size=2).extract_files([bad[0], good[0], bad[1], good[1], bad[2], good[2]])
    assert [r.name for r in result.rows] == ["g0.png", "g1.png", "g2.png"]
    assert sorted(e.name for e in result.failures) == ["cut.png", "empty.png", "text.png"]
    assert all(np.isfinite(r.values).all() for r in result.rows)
