"""The controls (cdi.controls): negative control, distribution check on real images, duplicates."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cdi import controls
from cdi.controls import IMAGE_STATISTIC_NAMES, ImageFingerprint
from cdi.errors import InputError
from cdi.stats import Protocol, ProtocolOptions
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
    variants = [
        decoded(encode(img, "JPEG", quality=75)),
        img.resize((64, 64), Image.Resampling.BICUBIC),
        blur(img),
        brighten(img, 10),
    ]
    for v in variants:
        assert controls.hamming_distance(h, controls.perceptual_hash(v)) <= controls.DEFAULT_HAMMING_THRESHOLD
    others = [controls.hamming_distance(h, controls.perceptual_hash(o)) for o in digit_images[1:]]
    assert np.median(others) > 16


def _prints(images: list[Image.Image], prefix: str, fmt: str = "PNG") -> list[ImageFingerprint]:
    return [controls.fingerprint(f"{prefix}{i}.png", encode(img, fmt)) for i, img in enumerate(images)]


def test_duplicates_found_and_excluded(digit_images: list[Image.Image]) -> None:
    p_imgs = digit_images[:12]
    u_imgs = digit_images[100:112]
    p = _prints(p_imgs, "p")
    u = _prints(u_imgs, "u")
    # U[3] is P[2]'s very file; U[5] is P[4] re-encoded as JPEG; P[9] repeats P[7]'s file;
    # U[8] is U[6] resized.
    u[3] = ImageFingerprint("u3.png", p[2].sha256, p[2].phash)
    u[5] = controls.fingerprint("u5.jpg", encode(p_imgs[4], "JPEG", quality=90))
    p[9] = ImageFingerprint("p9.png", p[7].sha256, p[7].phash)
    u[8] = controls.fingerprint("u8.png", encode(u_imgs[6].resize((64, 64))))

    report = controls.find_duplicates(p, u)
    found = {(pair.kind, pair.scope, pair.first.name, pair.second.name) for pair in report.pairs}
    assert ("exact", "between", "p2.png", "u3.png") in found
    assert ("perceptual", "between", "p4.png", "u5.jpg") in found
    assert ("exact", "within_P", "p7.png", "p9.png") in found
    assert ("perceptual", "within_U", "u6.png", "u8.png") in found
    assert report.has_between_set
    assert all(pair.kind == "perceptual" or pair.distance == 0 for pair in report.pairs)

    excluded = controls.duplicates_to_exclude(report)
    assert {2, 4, 9} <= set(excluded.p) and 7 not in excluded.p
    assert {3, 5, 8} <= set(excluded.u) and 6 not in excluded.u
    assert len(excluded.reasons) == len(report.groups)

    exact_only = controls.find_duplicates(p, u, hamming_threshold=-1)
    assert {pair.kind for pair in exact_only.pairs} == {"exact"}
    assert [g.scope for g in exact_only.groups] == ["between", "within_P"]


def test_duplicate_groups_merge_chains() -> None:
    a = ImageFingerprint("a", "x" * 64, 0)
    b = ImageFingerprint("b", "y" * 64, 0b11)  # 2 bits from a
    c = ImageFingerprint("c", "z" * 64, 0b1111)  # 2 bits from b, 4 from a
    far = ImageFingerprint("far", "w" * 64, 2**64 - 1)
    report = controls.find_duplicates([a, far], [b, c], hamming_threshold=2)
    assert len(report.pairs) == 2
    (group,) = report.groups
    assert group.scope == "between" and group.kind == "perceptual"
    assert [m.name for m in group.members] == ["a", "b", "c"]
    excluded = controls.duplicates_to_exclude(report)
    assert (excluded.p, excluded.u) == ((0,), (0, 1))


def test_distinct_digits_are_rarely_near_duplicates(digit_images: list[Image.Image]) -> None:
    # 8×8 digits hold little detail: two drawings of one digit can hash within the threshold
    # (measured: 73 of the 1.6 M pairs of the whole set), never as exact duplicates.
    report = controls.find_duplicates(_prints(digit_images[:100], "p"), _prints(digit_images[100:], "u"))
    assert all(pair.kind == "perceptual" for pair in report.pairs)
    assert len(report.pairs) <= 3
