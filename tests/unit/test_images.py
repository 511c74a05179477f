"""cdi.images: every format and mode Pillow reads, the documented preprocessing, bad files.

Every test image is made in memory with Pillow and numpy.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from PIL import ImageFile as PilImageFile

from cdi.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    NotAnImageError,
    TruncatedImageError,
)
from cdi.images import (
    SUPPORTED_MODES,
    ImageFile,
    _to_8bit,
    list_image_files,
    open_image,
    to_model_array,
)

# --- helpers ------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 30) -> Image.Image:
    """An RGB image whose red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, w)[None, :]
    y = np.linspace(0, 255, h)[:, None]
    arr = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), np.full((h, w), 128.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def grey16(value: int | np.ndarray, size: tuple[int, int] = (8, 8)) -> Image.Image:
    arr = np.broadcast_to(np.asarray(value, dtype=np.uint16), size[::-1]).copy()
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return img


def model_input(data: bytes, size: int = 8, channels: int = 3, name: str = "x") -> np.ndarray:
    return to_model_array(open_image(data, name), size, channels)


def assert_model_array(x: np.ndarray, channels: int, size: int) -> None:
    assert x.shape == (channels, size, size)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    assert np.isfinite(x).all()
    assert -1.0 <= x.min() <= x.max() <= 1.0


def as_mode(mode: str) -> Image.Image:
    """The gradient in ``mode`` (grey modes from its luminance)."""
    img = gradient()
    grey = np.asarray(img.convert("L"))
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)
    if mode == "I;16B":
        return Image.fromarray((grey.astype(np.uint16) * 257).astype(">u2"))
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 300, "I")
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0, "F")
    if mode == "LA":
        return Image.merge("LA", (img.convert("L"), Image.new("L", img.size, 200)))
    if mode == "RGBA":
        return Image.merge("RGBA", (*img.split(), Image.new("L", img.size, 200)))
    if mode == "P":
        return img.quantize(64)
    return img.convert(mode)


# --- every format and mode ----------------------------------------------------------------

CASES = [
    ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "1"),
    ("PNG", "I;16"),
    ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"),
    ("WEBP", "RGB"), ("WEBP", "RGBA"),
    ("GIF", "P"), ("GIF", "L"),
    ("TIFF", "RGB"), ("TIFF", "RGBA"), ("TIFF", "L"), ("TIFF", "LA"), ("TIFF", "P"), ("TIFF", "1"),
    ("TIFF", "CMYK"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("TIFF", "I"), ("TIFF", "F"),
    ("BMP", "RGB"), ("BMP", "L"), ("BMP", "P"), ("BMP", "1"),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("fmt", "mode"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_each_format_and_mode_loads(fmt, mode, channels):
    x = model_input(encode(as_mode(mode), fmt), size=16, channels=channels, name=f"x.{fmt.lower()}")
    assert_model_array(x, channels, 16)
    assert x.std() > 0.05  # the gradient survived decoding and conversion


@pytest.mark.parametrize("mode", sorted(SUPPORTED_MODES))
def test_every_supported_mode_converts(mode):
    img = Image.new(mode, (6, 4))
    assert _to_8bit(img).mode in ("L", "LA", "RGB", "RGBA")
    for channels in (1, 3):
        assert_model_array(to_model_array(img, 4, channels), channels, 4)


def test_resolution_up_and_down():
    assert_model_array(model_input(encode(gradient(7, 5), "PNG"), size=32), 3, 32)
    assert_model_array(model_input(encode(gradient(300, 200), "PNG"), size=8), 3, 8)


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_white_black_and_grey(fmt):
    assert np.array_equal(model_input(encode(grey16(65535), fmt), channels=1), np.ones((1, 8, 8), np.float32))
    assert np.array_equal(model_input(encode(grey16(0), fmt), channels=1), -np.ones((1, 8, 8), np.float32))
    # Scaled by the full 16-bit range, not the image's maximum: 128·257 is 8-bit 128.
    assert np.allclose(model_input(encode(grey16(128 * 257), fmt), channels=3), 128 / 127.5 - 1, atol=1e-6)


def test_sixteen_bit_big_endian_tiff():
    img = Image.fromarray(np.full((8, 8), 65535, dtype=">u2"))
    assert img.mode == "I;16B"
    assert np.allclose(model_input(encode(img, "TIFF"), channels=1), 1.0)


def test_thirty_two_bit_grey_is_scaled_by_its_maximum():
    arr = np.zeros((8, 8), np.int32)
    arr[:, 4:] = 100_000
    x = model_input(encode(Image.fromarray(arr, "I"), "TIFF"), channels=1)
    assert np.allclose(x[0, :, 0], -1.0) and np.allclose(x[0, :, -1], 1.0)


def test_float_image_in_unit_range_spans_the_full_range():
    arr = np.zeros((8, 8), np.float32)
    arr[:, 4:] = 1.0
    x = model_input(encode(Image.fromarray(arr, "F"), "TIFF"), channels=1)
    assert np.allclose(x[0, :, :4], -1.0) and np.allclose(x[0, :, 4:], 1.0)


def test_thirty_two_bit_grey_holding_8_bit_values_stays_8_bit():
    x = model_input(encode(Image.fromarray(np.full((8, 8), 128, np.int32), "I"), "TIFF"), channels=1)
    assert np.allclose(x, 128 / 127.5 - 1, atol=1e-6)


def test_float_image_with_nan_and_inf_stays_finite():
    arr = np.full((8, 8), 0.5, np.float32)
    arr[0, 0], arr[1, 1], arr[2, 2] = np.nan, np.inf, -np.inf
    assert_model_array(model_input(encode(Image.fromarray(arr, "F"), "TIFF")), 3, 8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_fully_transparent_image_is_white(fmt, channels):
    data = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.array_equal(model_input(data, channels=channels), np.ones((channels, 8, 8), np.float32))


def test_transparent_grey_is_white():
    data = encode(Image.new("LA", (8, 8), (0, 0)), "PNG")
    assert np.allclose(model_input(data, channels=1), 1.0)


def test_half_transparent_black_is_composited_on_white():
    x = model_input(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG"))
    assert np.allclose(x, 127 / 127.5 - 1, atol=1.5 / 127.5)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_white(fmt):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))  # left half red, right half palette index 0 (transparent)
    x = model_input(encode(img, fmt, transparency=0))
    assert np.allclose(x[:, :, 4:], 1.0)
    assert np.allclose(x[:, :, :2], np.array([1.0, -1.0, -1.0])[:, None, None])


def test_palette_without_transparency():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert np.allclose(model_input(encode(img, "PNG")), np.array([-1.0, -1.0, 1.0])[:, None, None])


def test_colour_key_transparency_is_white():
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    x = model_input(encode(img, "PNG", transparency=(10, 20, 30)))
    assert np.allclose(x, 1.0)


def test_one_bit_image():
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    for fmt in ("PNG", "TIFF", "BMP"):
        x = model_input(encode(img, fmt), channels=1)
        assert np.allclose(x[0, :, :4], 1.0) and np.allclose(x[0, :, 4:], -1.0)


def test_cmyk_pure_cyan_matches_pillow():
    img = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    expected = np.asarray(img.convert("RGB"), np.float32)[0, 0] / 127.5 - 1
    assert np.allclose(expected, [-1.0, 1.0, 1.0])
    x = model_input(encode(img, "TIFF"))
    assert np.allclose(x, expected[:, None, None])
    # JPEG stores CMYK lossily (and Adobe-inverted): only close to cyan.
    x = model_input(encode(img, "JPEG", quality=100))
    assert np.allclose(x, expected[:, None, None], atol=0.05)


@pytest.mark.parametrize("rgb", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (40, 200, 90)])
def test_one_channel_models_get_luminance(rgb):
    x = model_input(encode(Image.new("RGB", (8, 8), rgb), "PNG"), channels=1)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert np.allclose(x, luma / 127.5 - 1, atol=1 / 127.5)


def test_three_channel_models_replicate_grey():
    x = model_input(encode(as_mode("L"), "PNG"), size=16, channels=3)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])


def test_exact_scaling_of_8_bit_values():
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    x = model_input(encode(Image.fromarray(arr, "L"), "PNG"), channels=1)
    assert np.allclose(x[0], arr / 127.5 - 1, atol=1e-6)


# --- centre crop, resize ------------------------------------------------------------------


def test_centre_crop_of_a_wide_image_keeps_the_centre():
    img = Image.new("RGB", (90, 30), (0, 0, 0))
    img.paste((255, 0, 0), (30, 0, 60, 30))  # the centre square is red, the sides black
    x = model_input(encode(img, "PNG"), size=10)
    assert np.allclose(x, np.array([1.0, -1.0, -1.0])[:, None, None], atol=1e-5)


def test_centre_crop_of_a_tall_image_keeps_the_centre():
    img = Image.new("L", (20, 60), 0)
    img.paste(255, (0, 20, 20, 40))
    assert np.allclose(model_input(encode(img, "PNG"), size=20, channels=1), 1.0)


def test_odd_margins_crop_the_same_as_pillow():
    img = gradient(31, 20)
    x = to_model_array(img, 20, 3)
    expected = np.asarray(img.crop((5, 0, 25, 20)), np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert np.allclose(x, expected)


def test_resize_is_bicubic():
    img = gradient(64, 64)
    expected = np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1)
    assert np.allclose(to_model_array(img, 16, 3), expected / 127.5 - 1)


# --- EXIF orientation ---------------------------------------------------------------------


def _marked_square() -> Image.Image:
    """A 4×4 grey image with 16 distinct values (any flip or rotation changes it)."""
    return Image.fromarray((np.arange(16, dtype=np.uint8) * 16).reshape(4, 4), "L")


def _with_orientation(img: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(orientation):
    data = _with_orientation(_marked_square(), orientation, "PNG")
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    x = model_input(data, size=4, channels=1)
    assert np.allclose(x[0], np.asarray(expected, np.float32) / 127.5 - 1)
    if orientation != 1:
        assert not np.allclose(x[0], np.asarray(_marked_square(), np.float32) / 127.5 - 1)


def test_exif_rotation_of_a_jpeg():
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    # 6: shown rotated 90° clockwise, so the image is portrait with the white half on top.
    x = model_input(_with_orientation(img, 6, "JPEG"), size=20, channels=1)
    assert x[0, :6].mean() > 0.8 and x[0, -6:].mean() < -0.8


def test_exif_orientation_applies_to_sixteen_bit_images():
    arr = np.zeros((4, 4), np.uint16)
    arr[0, :] = 65535  # top row white
    data = _with_orientation(Image.fromarray(arr), 6, "TIFF")
    x = model_input(data, size=4, channels=1)  # rotated clockwise: the right column is white
    assert np.allclose(x[0, :, -1], 1.0) and np.allclose(x[0, :, 0], -1.0)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_damaged_exif_is_ignored():
    jpeg = encode(Image.new("RGB", (8, 8), (255, 255, 255)), "JPEG")
    app1 = b"Exif\x00\x00" + b"MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\xff\xff" + b"\xff" * 20
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]
    assert np.allclose(model_input(data), 1.0, atol=0.02)


# --- multi-frame files ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_first_frame_of_an_animated_or_multi_page_file(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 255, 255), (0, 0, 0), (0, 0, 255))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.allclose(model_input(data), 1.0)


# --- bad files ----------------------------------------------------------------------------


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", encode(gradient(), "PNG"))
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small grey PNG whose IHDR (with a valid CRC) claims ``width`` × ``height``."""
    data = bytearray(encode(Image.new("L", (4, 4), 0), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (4, 4), 0), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8), 0), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bad_png_crc() -> bytes:
    data = bytearray(encode(gradient(), "PNG"))
    data[29] ^= 0xFF  # the IHDR checksum
    return bytes(data)


def _truncated(fmt: str) -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    return data[: len(data) // 2]


BAD_FILES = {
    "empty": (b"", EmptyImageError),
    "text": (b"just some text, not an image\n", NotAnImageError),
    "zip": (_zip(), NotAnImageError),
    "random bytes": (np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes(), NotAnImageError),
    "eps": (encode(Image.new("L", (4, 4)), "EPS"), NotAnImageError),
    "png truncated": (_truncated("PNG"), TruncatedImageError),
    "jpeg truncated": (_truncated("JPEG"), TruncatedImageError),
    "webp truncated": (_truncated("WEBP"), TruncatedImageError),
    "tiff truncated": (_truncated("TIFF"), TruncatedImageError),
    "bmp truncated": (_truncated("BMP"), TruncatedImageError),
    "gif truncated": (encode(gradient(64, 64).convert("P"), "GIF")[:1500], TruncatedImageError),
    "png signature only": (b"\x89PNG\r\n\x1a\n", CorruptImageError),
    "png bad checksum": (_bad_png_crc(), CorruptImageError),
    "png bomb": (_png_claiming(100_000, 100_000), DecompressionBombError),
    "gif bomb": (_gif_claiming(65_535, 65_535), DecompressionBombError),
    "jpeg bomb": (_jpeg_claiming(60_000, 60_000), DecompressionBombError),
    "png zero width": (_png_claiming(0, 4), ImageError),
}


@pytest.mark.parametrize(("data", "error"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_raise_their_typed_error_naming_the_file(data, error):
    with pytest.raises(error, match=r"^holiday photo\.png: ") as info:
        open_image(data, "holiday photo.png")
    assert isinstance(info.value, ImageError)
    assert info.value.name == "holiday photo.png"
    with pytest.raises(error) as info:
        to_model_array(open_image(data, "other.jpg"), 8, 3)
    assert info.value.name == "other.jpg" and "other.jpg" in str(info.value)


def test_error_codes_are_distinct():
    codes = {cls.code for cls in (EmptyImageError, NotAnImageError, TruncatedImageError,
                                  CorruptImageError, DecompressionBombError)}
    assert len(codes) == 5


# --- decompression bombs ------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded (allocated)."""

    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PilImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(("data", "max_pixels"), [
    (_png_claiming(100_000, 100_000), 40_000_000),   # beyond twice Pillow's own limit
    (_png_claiming(10_000, 10_000), 10**9),          # Pillow only warns here: still refused
    (_png_claiming(8_000, 8_000), 40_000_000),       # under Pillow's limit, over ours
    (_png_claiming(1_000, 1_000), 999_999),
    (_gif_claiming(65_535, 65_535), 40_000_000),
    (_jpeg_claiming(60_000, 60_000), 40_000_000),
], ids=["png-1e10", "png-1e8", "png-6.4e7", "png-1e6", "gif", "jpeg"])
def test_bombs_are_refused_from_the_header_alone(data, max_pixels, no_decoding):
    start = time.perf_counter()
    with pytest.raises(DecompressionBombError, match="bomb.png"):
        open_image(data, "bomb.png", max_pixels=max_pixels)
    assert time.perf_counter() - start < 0.5


def test_small_image_over_a_low_pixel_limit():
    data = encode(gradient(40, 30), "PNG")
    with pytest.raises(DecompressionBombError, match=r"40×30 pixels exceeds the limit of 1000"):
        open_image(data, "big.png", max_pixels=1000)
    assert open_image(data, "big.png", max_pixels=1200).size == (40, 30)
    with pytest.raises(DecompressionBombError):
        to_model_array(open_image(data, "big.png", max_pixels=1000), 8, 3)


def test_open_image_decodes_fully_and_keeps_the_mode():
    img = open_image(encode(grey16(1000), "PNG"), "x.png")
    assert img.mode == "I;16" and img.size == (8, 8)
    assert np.asarray(img).max() == 1000


def test_unsupported_channel_count():
    with pytest.raises(ValueError):
        to_model_array(gradient(), 8, 4)


# --- fuzzing ------------------------------------------------------------------------------


def _check_any_outcome(data: bytes) -> None:
    """Loading ``data`` gives a valid model input or an ImageError, never anything else."""
    try:
        img = open_image(data, "fuzz.bin")
    except ImageError as exc:
        assert exc.name == "fuzz.bin" and str(exc).startswith("fuzz.bin: ")
        return
    for channels in (1, 3):
        assert_model_array(to_model_array(img, 8, channels), channels, 8)


def _fuzz_sources() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png": encode(img, "PNG", exif=exif),
        "jpeg": encode(img, "JPEG", exif=exif),
        "webp": encode(img, "WEBP"),
        "gif": encode(img.convert("P"), "GIF"),
        "tiff": encode(img, "TIFF", exif=exif),
        "tiff16": encode(grey16(rng.integers(0, 65536, (16, 16)), (16, 16)), "TIFF"),
        "bmp": encode(img, "BMP"),
    }


FUZZ_SOURCES = _fuzz_sources()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt", FUZZ_SOURCES.keys())
def test_truncation_at_any_offset_gives_a_load_or_an_image_error(fmt):
    data = FUZZ_SOURCES[fmt]
    for cut in sorted({*range(1, 40, 3), *np.linspace(40, len(data) - 1, 25).astype(int)}):
        _check_any_outcome(data[:cut])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt", FUZZ_SOURCES.keys())
def test_flipped_bytes_give_a_load_or_an_image_error(fmt):
    data = FUZZ_SOURCES[fmt]
    rng = np.random.default_rng(sum(fmt.encode()))
    for _ in range(40):
        damaged = bytearray(data)
        for pos in rng.integers(0, len(data), int(rng.integers(1, 6))):
            damaged[pos] ^= int(rng.integers(1, 256))
        _check_any_outcome(bytes(damaged))


@pytest.mark.filterwarnings("ignore")
def test_header_fields_set_to_extremes_give_a_load_or_an_image_error():
    rng = np.random.default_rng(3)
    for data in FUZZ_SOURCES.values():
        for pos in rng.integers(0, min(len(data), 200), 12):
            for word in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"):
                damaged = bytearray(data)
                damaged[pos:pos + 4] = word
                _check_any_outcome(bytes(damaged[: len(data)]))


# --- files on disk ------------------------------------------------------------------------


def test_image_file_read_and_listing(tmp_path):
    data = encode(gradient(), "PNG")
    (tmp_path / "b.PNG").write_bytes(data)
    (tmp_path / "a.jpg").write_bytes(encode(gradient(), "JPEG"))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpg", "b.PNG"]
    f = ImageFile.read(tmp_path / "b.PNG")
    assert f.name == "b.PNG" and f.data == data and len(f.sha256) == 64
    assert ImageFile.read(tmp_path / "b.PNG", name="renamed.png").name == "renamed.png"
    with pytest.raises(NotADirectoryError):
        list_image_files(tmp_path / "notes.txt")
