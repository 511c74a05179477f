"""The controls (cdi.controls): negative control, distribution check on real images, duplicates."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from cdi import controls
from cdi.controls import IMAGE_STATISTIC_NAMES, ImageFingerprint
from cdi.errors import InputError
from cdi.options import Protocol, ProtocolOptions
from cdi.zoo import digits

# --- helpers ----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **params: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def statistics_of(images: list[Image.Image]) -> np.ndarray:
    rows = []
    for img in images:
        data = encode(img)
        rows.append(controls.image_statistics(decoded(data), len(data)))
    return np.array(rows)


def brighten(img: Image.Image, levels: int = 40) -> Image.Image:
    arr = np.clip(np.asarray(img).astype(np.int64) + levels, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def blur(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=1))


@pytest.fixture(scope="module")
def digit_images() -> list[Image.Image]:
    """200 random digits at 32×32: the first 100 play P, the others U (same distribution)."""
    order = np.random.default_rng(0).permutation(digits.count())[:200]
    return [digits.image(int(i), 32) for i in order]


# --- negative control ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(Protocol))
def test_negative_control_splits_u_in_halves(protocol: Protocol) -> None:
    xu = np.random.default_rng(1).normal(size=(41, 26))
    opts = ProtocolOptions(n_permutations=199)
    res = controls.negative_control(xu, protocol, opts, random_state=5)
    assert len(res.half_p) == 20 and len(res.half_u) == 21
    assert sorted(res.half_p + res.half_u) == list(range(41))
    assert res.test.protocol is protocol and res.test.n_p == 20 and res.test.n_u == 21
    assert 0.0 < res.p_value <= 1.0
    assert controls.negative_control(xu, protocol, opts, random_state=5) == res
    # The test's rows index into the halves, which index into U.
    assert sorted(r.index for r in res.test.rows if r.set_name == "P") == list(range(20))
    assert sorted(r.index for r in res.test.rows if r.set_name == "U") == list(range(21))


def test_negative_control_false_positives_on_u_alone() -> None:
    # U's halves are exchangeable by construction: significant controls stay rare.
    rng = np.random.default_rng(2)
    p = np.array([controls.negative_control(rng.normal(size=(60, 26)), random_state=s).p_value for s in range(100)])
    assert int((p < 0.05).sum()) <= 13  # Binomial(100, 0.05) exceeds 13 with probability < 1e-3


def test_negative_control_needs_enough_u() -> None:
    with pytest.raises(InputError, match="negative control"):
        controls.negative_control(np.random.default_rng(0).normal(size=(19, 26)), "reference", random_state=0)


# --- image statistics ---------------------------------------------------------------------


def test_image_statistics_of_a_known_image() -> None:
    img = Image.new("RGB", (40, 20), (100, 100, 100))
    data = encode(img)
    s = dict(zip(IMAGE_STATISTIC_NAMES, controls.image_statistics(decoded(data), len(data)), strict=True))
    assert (s["width"], s["height"]) == (40, 20)
    assert s["log_aspect"] == pytest.approx(np.log(2))
    assert s["bytes_per_pixel"] == pytest.approx(len(data) / 800)
    assert s["mean_r"] == s["mean_g"] == s["mean_b"] == pytest.approx(100)
    assert s["std_r"] == 0 and s["log_laplacian_var"] == 0 and s["mean_abs_gradient"] == 0
    assert s["luma_hist_06"] == pytest.approx(1.0)  # 100 lies in [96, 112)
    assert s["mean_saturation"] == 0 and s["colourfulness"] == 0
    assert s["clipped_dark"] == 0 and s["clipped_bright"] == 0
    assert (s["format_png"], s["format_jpeg"], s["format_other"]) == (1, 0, 0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_image_statistics_accepts_every_mode(mode: str) -> None:
    base = Image.new("RGB", (700, 300), (10, 200, 40))
    img = base.convert(mode) if mode != "I;16" else Image.new("I;16", (700, 300), 30000)
    out = controls.image_statistics(img, 1234)
    assert out.shape == (len(IMAGE_STATISTIC_NAMES),) and np.all(np.isfinite(out))
    assert out[0] == 700  # the original width, although pixels are analysed at 512 at most


def test_image_statistics_rejects_negative_size() -> None:
    with pytest.raises(InputError):
        controls.image_statistics(Image.new("L", (4, 4)), -1)


# --- distribution check on real images ----------------------------------------------------


def test_same_distribution_is_not_flagged(digit_images: list[Image.Image]) -> None:
    stats_all = statistics_of(digit_images)
    res = controls.distribution_check(stats_all[:100], stats_all[100:], random_state=0)
    assert res.p_value >= 0.01 and res.auc < 0.6
    assert res.n_p == res.n_u == 100 and res.n_permutations == 999


@pytest.mark.parametrize(("name", "change"), [("brightened", brighten), ("blurred", blur)])
def test_shifted_distribution_is_caught(
    digit_images: list[Image.Image], name: str, change: Callable[[Image.Image], Image.Image]
) -> None:
    stats_p = statistics_of(digit_images[:100])
    stats_u = statistics_of([change(img) for img in digit_images[100:]])
    res = controls.distribution_check(stats_p, stats_u, random_state=0)
    assert res.p_value <= 0.002 and res.auc > 0.9, name
    assert res.largest_differences  # the report can say what differs


def test_distribution_check_validates_input() -> None:
    with pytest.raises(InputError, match="at least 10"):
        controls.distribution_check(np.zeros((5, 3)), np.zeros((20, 3)), 0, statistic_names=("a", "b", "c"))
    with pytest.raises(InputError, match="row 1, column 0"):
        bad = np.ones((20, len(IMAGE_STATISTIC_NAMES)))
        bad[1, 0] = np.nan
        controls.distribution_check(bad, np.ones((20, len(IMAGE_STATISTIC_NAMES))), 0)


# --- duplicates ---------------------------------------------------------------------------


def test_perceptual_hash_is_robust_and_discriminating(digit_images: list[Image.Image]) -> None:
    img = digit_images[0]
    h = controls.perceptual_hash(img)
    assert 0 <= h < 2**64
    variants = [decoded(encode(img, "JPEG", quality=75)), img.resize((64, 64), Image.Resampling.BICUBIC)]
    for v in variants:
        assert controls.hamming_distance(h, controls.perceptual_hash(v)) <= 4
    others = [controls.hamming_distance(h, controls.perceptual_hash(o)) for o in digit_images[1:]]
    assert np.median(others) > 16


def _prints(images: list[Image.Image], prefix: str, fmt: str = "PNG") -> list[ImageFingerprint]:
    return [controls.fingerprint(f"{prefix}{i}.png", encode(img, fmt)) for i, img in enumerate(images)]


def _photo() -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(np.asarray(load_sample_images().images[0])).resize((160, 107))


def _crop(img: Image.Image, frac: float, sides: str = "ltrb") -> Image.Image:
    w, h = img.size
    dx, dy = round(w * frac), round(h * frac)
    return img.crop((dx if "l" in sides else 0, dy if "t" in sides else 0,
                     w - (dx if "r" in sides else 0), h - (dy if "b" in sides else 0)))


def _oriented(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels are turned; the viewer turns them back
    return encode(img.transpose(Image.Transpose.ROTATE_90).convert("RGB"), "JPEG", quality=95, exif=exif)


COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg q50": lambda im: encode(im.convert("RGB"), "JPEG", quality=50),
    "jpeg q30": lambda im: encode(im.convert("RGB"), "JPEG", quality=30),
    "half size": lambda im: encode(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)),
    "double size": lambda im: encode(im.resize((im.width * 2, im.height * 2), Image.Resampling.LANCZOS)),
    "crop 3% each side": lambda im: encode(_crop(im, 0.03)),
    "crop 4% left and top": lambda im: encode(_crop(im, 0.04, "lt")),
    "brighter by 10": lambda im: encode(brighten(im, 10)),
    "exif orientation": _oriented,
}


@pytest.mark.parametrize("kind", list(COPIES))
def test_copies_are_linked(kind: str, digit_images: list[Image.Image]) -> None:
    # A 32-pixel digit at half size keeps too little to verify (measured: bench/duplicates_study.py).
    originals = [_photo()] if kind == "half size" else [_photo(), digit_images[3]]
    for original in originals:
        a = controls.fingerprint("original.png", encode(original))
        b = controls.fingerprint("copy", COPIES[kind](original))
        report = controls.find_duplicates([a], [b])
        assert [(pair.kind, pair.scope) for pair in report.pairs] == [("perceptual", "between")], kind
        assert report.pairs[0].difference <= controls.DEFAULT_DIFFERENCE_THRESHOLD


def test_a_different_part_of_a_photo_is_not_a_copy() -> None:
    photo = _photo()
    a = controls.fingerprint("a.png", encode(photo.crop((0, 0, 120, 107))))
    b = controls.fingerprint("b.png", encode(photo.crop((30, 0, 150, 107))))  # shifted by a quarter
    assert controls.find_duplicates([a], [b]).pairs == ()


def _glyphs(text: str, size: int = 48) -> list[Image.Image]:
    import matplotlib
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 34)
    out = []
    for ch in text:
        img = Image.new("L", (size, size), 255)
        ImageDraw.Draw(img).text((size / 2, size / 2), ch, fill=0, font=font, anchor="mm")
        out.append(img)
    return out


def test_look_alike_line_art_is_not_linked() -> None:
    # Accents, dots and tails are small but real differences; none of these is a copy. (Not "l"
    # against "I": in DejaVu Sans both are one bar, the same picture up to a light crop.)
    text = "eéèêëoòóôõöuùúûüaàáâäcçnñiíìl1O0Q"
    prints = _prints(_glyphs(text), "g")
    report = controls.find_duplicates(prints[::2], prints[1::2])
    assert report.pairs == (), [(p.first.name, p.second.name, p.difference) for p in report.pairs]
    # … while the same glyphs, re-encoded, are.
    copies = [controls.fingerprint(f"c{i}.jpg", encode(g.convert("RGB"), "JPEG", quality=50))
              for i, g in enumerate(_glyphs("éèQ"))]
    assert len(controls.find_duplicates(_prints(_glyphs("éèQ"), "g"), copies).pairs) == 3


def test_look_alike_products_are_not_linked() -> None:
    # One shoe shape on white in four greys, sole heights varying: a shop's range of look-alikes.
    rng = np.random.default_rng(0)
    images = []
    for _ in range(40):
        img = Image.new("RGB", (128, 128), (255, 255, 255))
        d = ImageDraw.Draw(img)
        grey = int(rng.choice([30, 60, 200, 235]) + rng.integers(-6, 7))
        sole = float(rng.uniform(84, 92))
        d.polygon([(14, sole), (14, 68), (45, 60), (76, 44), (86, 42), (112, 45), (115, sole)],
                  fill=(grey, grey, grey), outline=(grey // 2,) * 3)
        d.rounded_rectangle((12, sole - 1, 117, sole + rng.uniform(6, 11)), radius=4, fill=(240, 240, 240))
        # What tells two shoes of a range apart: the side stripe's colour, place and slant.
        x = float(rng.uniform(36, 60))
        d.line([(x, sole - 3), (x + rng.uniform(12, 34), 52)], fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
               width=int(rng.integers(6, 10)))
        images.append(img)
    prints = _prints(images, "shoe")
    report = controls.find_duplicates(prints[:20], prints[20:])
    assert report.pairs == (), [(p.first.name, p.second.name, p.difference) for p in report.pairs]


def test_distinct_digits_are_not_linked(digit_images: list[Image.Image]) -> None:
    # Two drawings of one digit can look almost alike at 8×8; verification tells them apart.
    report = controls.find_duplicates(_prints(digit_images[:100], "p"), _prints(digit_images[100:], "u"))
    assert report.pairs == ()


def test_duplicates_found_and_excluded(digit_images: list[Image.Image]) -> None:
    p_imgs = digit_images[:12]
    u_imgs = digit_images[100:112]
    p = _prints(p_imgs, "p")
    u = _prints(u_imgs, "u")
    # U[3] is P[2]'s very file; U[5] is P[4] re-encoded as JPEG; P[9] repeats P[7]'s file;
    # U[8] is U[6] resized.
    u[3] = replace(p[2], name="u3.png")
    u[5] = controls.fingerprint("u5.jpg", encode(p_imgs[4], "JPEG", quality=90))
    p[9] = replace(p[7], name="p9.png")
    u[8] = controls.fingerprint("u8.png", encode(u_imgs[6].resize((64, 64))))

    report = controls.find_duplicates(p, u)
    found = {(pair.kind, pair.scope, pair.first.name, pair.second.name) for pair in report.pairs}
    assert found == {
        ("exact", "between", "p2.png", "u3.png"),
        ("perceptual", "between", "p4.png", "u5.jpg"),
        ("exact", "within_P", "p7.png", "p9.png"),
        ("perceptual", "within_U", "u6.png", "u8.png"),
    }
    assert report.has_between_set
    assert all(pair.kind == "perceptual" or pair.difference == 0 for pair in report.pairs)

    excluded = controls.duplicates_to_exclude(report)
    assert excluded.p == (2, 4, 9)
    assert excluded.u == (3, 5, 8)
    assert len(excluded.reasons) == len(report.groups)
    assert any("u6.png" in r and "u8.png" in r for r in excluded.reasons)

    exact_only = controls.find_duplicates(p, u, difference_threshold=-1)
    assert {pair.kind for pair in exact_only.pairs} == {"exact"}
    assert [g.scope for g in exact_only.groups] == ["between", "within_P"]


def test_duplicate_groups_merge_chains(digit_images: list[Image.Image]) -> None:
    img = digit_images[5]
    a = controls.fingerprint("a", encode(img))
    b = controls.fingerprint("b", encode(img, "JPEG", quality=60))
    c = controls.fingerprint("c", encode(img.resize((64, 64), Image.Resampling.LANCZOS)))
    far = controls.fingerprint("far", encode(digit_images[6]))
    report = controls.find_duplicates([a, far], [b, c])
    (group,) = report.groups
    assert group.scope == "between" and group.kind == "perceptual"
    assert [m.name for m in group.members] == ["a", "b", "c"]
    excluded = controls.duplicates_to_exclude(report)
    assert (excluded.p, excluded.u) == ((0,), (0, 1))


def test_fingerprint_rejects_a_foreign_thumbnail(digit_images: list[Image.Image]) -> None:
    fp = replace(controls.fingerprint("a.png", encode(digit_images[0])), thumbnail=b"\0" * 10)
    with pytest.raises(InputError, match="thumbnail"):
        fp.pixels()
