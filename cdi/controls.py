"""The controls of an audit (method §7): negative control, distribution check, duplicates.

None of them involves a diffusion model except the negative control, which reuses the
features already computed for U. This module imports numpy, scipy, scikit-learn and Pillow
only.

Negative control
    U is split into two random halves, one playing P, and the audit's own protocol is run on
    them (:func:`negative_control`). Both halves are drawn from the same set, so the result
    is a draw from the protocol's null distribution; a significant one means the pipeline or
    the data break the exchangeability the test relies on.

Distribution check
    Model-free statistics of every image (:func:`image_statistics`: size, file bytes per
    pixel, colour and intensity histograms, sharpness, saturation, clipping, format) and a
    cross-validated classifier that tries to tell P from U (:func:`distribution_check`). The
    classifier is the scoring model of :mod:`cdi.scoring` (standardised L2 logistic
    regression), cross-fitted over K folds; its out-of-fold AUC is the statistic. The p-value
    comes from a permutation test that reruns the whole cross-validation on shuffled labels,
    exact under "P and U come from one distribution". A Mann–Whitney test on the pooled
    out-of-fold scores would not be: those scores come from K different models, fitted on
    overlapping data, and are not independent.

Duplicates
    Exact duplicates share the SHA-256 of their file bytes. Near-duplicates (the same picture
    re-encoded, resized, lightly cropped, brightened, or stored turned with an EXIF tag) are
    found in two stages (:func:`find_duplicates`). Candidates: every pair whose 8×8 RGB
    sketches, or the sketch of one and a 5 %-cropped sketch of the other, lie within
    ``DEFAULT_CANDIDATE_DISTANCE`` levels (:func:`candidate_pairs`; one matrix product per
    block of images, no pixel work). Verification, for candidates only: the two 32×32
    thumbnails are compared after undoing a crop of up to ``MAX_CROP`` of each side of either
    image, one gain and a per-channel offset (:func:`align`); the pair is linked when the RMS
    difference is at most ``DEFAULT_DIFFERENCE_THRESHOLD`` levels of 255 and no 4×4-pixel block
    differs by more than ``BLOCK_FACTOR`` times that. A 64-bit perceptual hash within 4 bits,
    the former rule, linked different pictures: measured by ``bench/duplicates_study.py`` on
    look-alike digits, glyphs, icons, product shots and photo tiles (docs/method.md). A
    perceptual hash is still computed and reported for each pair, never decisive.

    What is left out (:func:`duplicates_to_exclude`): every image of a group that spans P and
    U (method §7: an error in the owner's data, which the owner must resolve), and all but the
    first image of a group inside one set, so that no picture counts twice: two copies of one
    image on the same side are one draw, which a permutation test counting them as two would
    treat as independent evidence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn

from cdi.errors import InputError
from cdi.features.layout import FEATURE_NAMES

# The colour-mode conversion the models' inputs go through; reused, not copied.
from cdi.images import _to_8bit
from cdi.options import (
    DEFAULT_ALPHA,
    DEFAULT_N_FOLDS,
    DEFAULT_N_PERMUTATIONS,
    DEFAULT_PROTOCOL,
    Protocol,
    ProtocolOptions,
)
from cdi.reads import DIRECTION_FEATURES  # declared with the other parts of the verdict that read features
from cdi.scoring import validate_features
from cdi.stats import (
    ProtocolResult,
    auc,
    check_sizes,
    cohens_d,
    crossfit_replicates,
    permutation_p_value,
    resolve_seed,
    run_test,
    welch_greater,
)

__all__ = [
    "BLOCK_FACTOR",
    "DEFAULT_CANDIDATE_DISTANCE",
    "DEFAULT_DIFFERENCE_THRESHOLD",
    "IMAGE_STATISTIC_NAMES",
    "MAX_CROP",
    "THUMBNAIL_SIDE",
    "Alignment",
    "DistributionCheckResult",
    "DuplicateGroup",
    "DuplicatePair",
    "DuplicateReport",
    "Exclusion",
    "ImageFingerprint",
    "ImageRef",
    "NegativeControlResult",
    "StatisticDifference",
    "align",
    "candidate_pairs",
    "direction_check",
    "distribution_check",
    "duplicates_to_exclude",
    "find_duplicates",
    "fingerprint",
    "hamming_distance",
    "image_statistics",
    "negative_control",
    "perceptual_hash",
    "sketches",
    "verify",
]

SetName = Literal["P", "U"]

# --- negative control -------------------------------------------------------------------


@dataclass(frozen=True)
class NegativeControlResult:
    """The protocol's result on two random halves of U.

    ``test``'s P rows index into ``half_p`` and its U rows into ``half_u``: the positions,
    in U, of the images that played P and U. ``random_state`` is the seed of the split.
    """

    test: ProtocolResult
    half_p: tuple[int, ...]
    half_u: tuple[int, ...]
    random_state: int

    @property
    def p_value(self) -> float:
        return self.test.p_value

    @property
    def significant(self) -> bool:
        return self.test.significant


def negative_control(
    features_u: np.ndarray,
    protocol: Protocol | str = DEFAULT_PROTOCOL,
    options: ProtocolOptions | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    random_state: int | None = None,
) -> NegativeControlResult:
    """Run ``protocol`` with U's images ``features_u`` ``[n_u, k]`` split into two random halves.

    The first half (⌊n_u/2⌋ images) plays P. Raises :class:`InputError` when the halves are
    too small for the protocol.
    """
    x = np.asarray(features_u)
    if x.ndim != 2:
        raise InputError(f"U features must be a 2-D array [images, features], got shape {x.shape}")
    n_u = x.shape[0]
    try:
        check_sizes(n_u // 2, n_u - n_u // 2, protocol, options, negative_control=False)
    except InputError as exc:
        raise InputError(
            f"negative control: U's {n_u} images split into halves of {n_u // 2} and "
            f"{n_u - n_u // 2}, too few: {exc}"
        ) from None
    seed = resolve_seed(random_state)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_u)
    half_p = np.sort(order[: n_u // 2])
    half_u = np.sort(order[n_u // 2 :])
    inner_seed = int(rng.integers(2**32))
    result = run_test(x[half_p], x[half_u], protocol, options, alpha=alpha, random_state=inner_seed)
    return NegativeControlResult(
        test=result,
        half_p=tuple(int(i) for i in half_p),
        half_u=tuple(int(i) for i in half_u),
        random_state=seed,
    )


# --- distribution check -----------------------------------------------------------------

_HIST_BINS = 16
#: Longest side at which pixel statistics are computed: larger images are reduced first
#: (box filter), which bounds the cost and makes sharpness comparable across sizes.
_ANALYSIS_SIDE = 512
_FORMATS = ("jpeg", "png", "webp")

#: Names of the columns of :func:`image_statistics`, in order.
IMAGE_STATISTIC_NAMES: tuple[str, ...] = (
    "width",
    "height",
    "log_aspect",
    "bytes_per_pixel",
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    *(f"luma_hist_{i:02d}" for i in range(_HIST_BINS)),
    "luma_entropy",
    "log_laplacian_var",
    "mean_abs_gradient",
    "mean_saturation",
    "colourfulness",
    "clipped_dark",
    "clipped_bright",
    *(f"format_{name}" for name in _FORMATS),
    "format_other",
)


def image_statistics(img: Image.Image, file_size: int) -> np.ndarray:
    """Model-free statistics of one decoded image: float64 ``[len(IMAGE_STATISTIC_NAMES)]``.

    ``img`` as decoded from the file (``img.format`` is read when set), ``file_size`` the
    file's length in bytes. The image is oriented by its EXIF tag, brought to 8-bit RGB
    (transparency composited onto white, as the model sees it), and reduced to at most
    512 pixels on its longer side for the pixel statistics: per-channel means and standard
    deviations, a 16-bin luminance histogram (fractions) and its 256-bin entropy, the log
    variance of the 4-neighbour Laplacian (sharpness), the mean absolute gradient, mean HSV
    saturation, Hasler–Süsstrunk colourfulness and the fractions of clipped dark (≤ 2) and
    bright (≥ 253) pixels. Size, aspect, compressed bytes per pixel and the file format come
    from the original.
    """
    if file_size < 0:
        raise InputError(f"file_size must be non-negative, got {file_size}")
    fmt = (img.format or "").lower()
    oriented = ImageOps.exif_transpose(img) or img
    width, height = oriented.size
    if width <= 0 or height <= 0:
        raise InputError("the image has no pixels")
    rgb = _rgb8(oriented)
    if max(width, height) > _ANALYSIS_SIDE:
        factor = int(np.ceil(max(width, height) / _ANALYSIS_SIDE))
        rgb = rgb.reduce(factor)
    arr = np.asarray(rgb, dtype=np.float64)  # [h, w, 3]
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b

    hist = np.histogram(luma, bins=_HIST_BINS, range=(0.0, 256.0))[0] / luma.size
    fine = np.bincount(np.clip(np.rint(luma), 0, 255).astype(np.intp).ravel(), minlength=256) / luma.size
    nz = fine[fine > 0]
    entropy = float(-(nz * np.log2(nz)).sum())

    if luma.shape[0] >= 3 and luma.shape[1] >= 3:
        lap = (
            4.0 * luma[1:-1, 1:-1]
            - luma[:-2, 1:-1]
            - luma[2:, 1:-1]
            - luma[1:-1, :-2]
            - luma[1:-1, 2:]
        )
        lap_var = float(lap.var())
    else:
        lap_var = 0.0
    grads = []
    if luma.shape[1] > 1:
        grads.append(np.abs(np.diff(luma, axis=1)).mean())
    if luma.shape[0] > 1:
        grads.append(np.abs(np.diff(luma, axis=0)).mean())
    mean_grad = float(np.mean(grads)) if grads else 0.0

    top = arr.max(axis=2)
    bottom = arr.min(axis=2)
    saturation = np.where(top > 0, (top - bottom) / np.where(top > 0, top, 1.0), 0.0)
    rg = r - g
    yb = 0.5 * (r + g) - b
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))

    formats = [1.0 if fmt == name or (name == "jpeg" and fmt == "jpg") else 0.0 for name in _FORMATS]
    formats.append(0.0 if any(formats) else 1.0)
    values = [
        float(width),
        float(height),
        float(np.log(width / height)),
        file_size / float(width * height),
        *(float(c.mean()) for c in (r, g, b)),
        *(float(c.std()) for c in (r, g, b)),
        *hist.tolist(),
        entropy,
        float(np.log1p(lap_var)),
        mean_grad,
        float(saturation.mean()),
        colourfulness,
        float((luma <= 2.0).mean()),
        float((luma >= 253.0).mean()),
        *formats,
    ]
    out = np.asarray(values, dtype=np.float64)
    assert out.shape == (len(IMAGE_STATISTIC_NAMES),)
    return out


def _rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB as the models see the image (same mode handling as :mod:`cdi.images`)."""
    img = _to_8bit(img)
    if img.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


@dataclass(frozen=True)
class StatisticDifference:
    """How one image statistic differs between P and U: Cohen's d (P minus U) and AUC."""

    name: str
    cohens_d: float
    auc: float


@dataclass(frozen=True)
class DistributionCheckResult:
    """Can a model-free classifier tell P from U?

    ``auc``: out-of-fold AUC of the cross-validated classifier (0.5 = no better than
    chance); ``p_value``: one-sided permutation p-value of that AUC (H1: AUC above what
    chance gives), (1 + #{permuted AUC ≥ observed}) / (1 + n_permutations).
    ``largest_differences``: the statistics that differ most between the sets, by |d|, for
    the report (at most five, only those with |d| ≥ 0.2).
    """

    auc: float
    p_value: float
    n_p: int
    n_u: int
    n_folds: int
    n_permutations: int
    random_state: int
    statistic_names: tuple[str, ...]
    largest_differences: tuple[StatisticDifference, ...]


def distribution_check(
    stats_p: np.ndarray,
    stats_u: np.ndarray,
    random_state: int | None = None,
    *,
    n_folds: int = DEFAULT_N_FOLDS,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    statistic_names: Sequence[str] = IMAGE_STATISTIC_NAMES,
) -> DistributionCheckResult:
    """Try to tell P from U by their image statistics (``stats_p`` ``[n_p, s]``, ``stats_u`` ``[n_u, s]``).

    Cross-fitted logistic regression (the scoring model) over ``n_folds`` stratified folds;
    its out-of-fold AUC is tested by rerunning the whole cross-validation on
    ``n_permutations`` random relabellings. Raises :class:`InputError` for fewer than
    2 × ``n_folds`` images in a set or non-finite statistics.
    """
    xp = validate_features(stats_p, "P image statistics")
    xu = validate_features(stats_u, "U image statistics")
    if xp.shape[1] != xu.shape[1]:
        raise InputError(f"P has {xp.shape[1]} image statistics per image but U has {xu.shape[1]}")
    names = tuple(statistic_names)
    if len(names) != xp.shape[1]:
        raise InputError(f"{len(names)} statistic names for {xp.shape[1]} columns")
    if n_folds < 2 or n_permutations < 1:
        raise InputError("n_folds must be at least 2 and n_permutations at least 1")
    n_p, n_u = len(xp), len(xu)
    minimum = 2 * n_folds
    if min(n_p, n_u) < minimum:
        raise InputError(
            f"the distribution check needs at least {minimum} images per set ({n_folds} folds), "
            f"got P = {n_p}, U = {n_u}"
        )
    seed = resolve_seed(random_state)
    x = np.vstack([xp, xu])
    if np.all(x == x[0]):
        # Nothing distinguishes any image: the classifier cannot do better than chance.
        return DistributionCheckResult(0.5, 1.0, n_p, n_u, n_folds, n_permutations, seed, names, ())
    rep = crossfit_replicates(x, n_p, n_folds, n_permutations, seed)
    aucs = _auc_rows(rep.scores, rep.is_p)
    observed = float(aucs[0])
    p = permutation_p_value(observed, aucs[1:])

    diffs = []
    for j, name in enumerate(names):
        d = cohens_d(xp[:, j], xu[:, j])  # ±inf: constant within each set, different between
        if abs(d) < 0.2:
            continue
        diffs.append(StatisticDifference(name, d, auc(xp[:, j], xu[:, j])))
    diffs.sort(key=lambda s: -abs(s.cohens_d))
    return DistributionCheckResult(
        auc=observed,
        p_value=p,
        n_p=n_p,
        n_u=n_u,
        n_folds=n_folds,
        n_permutations=n_permutations,
        random_state=seed,
        statistic_names=names,
        largest_differences=tuple(diffs[:5]),
    )


def _auc_rows(scores: np.ndarray, is_p: np.ndarray) -> np.ndarray:
    """AUC (P positive, ties one half) of each row: ``[R, n]`` → ``[R]``."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_p = is_p.sum(axis=1)
    n_u = is_p.shape[1] - n_p
    u = np.where(is_p, ranks, 0.0).sum(axis=1) - n_p * (n_p + 1) / 2.0
    return np.asarray(u / (n_p * n_u), dtype=np.float64)


# --- duplicates -------------------------------------------------------------------------

#: Side, in pixels, of the thumbnail two images are compared at.
THUMBNAIL_SIDE = 32
#: Largest crop, as a fraction of the side, that verification undoes on each side of either image.
MAX_CROP = 0.08
#: Largest distance between two images' 8×8 RGB sketches (RMS levels of 255) that makes them candidates.
DEFAULT_CANDIDATE_DISTANCE = 16.0
#: Largest aligned difference (RMS levels of 255) that verifies a candidate pair as near-duplicates.
#: Measured (bench/duplicates_study.py, docs/method.md): at 4, false links between distinct
#: look-alike digits, glyphs, icons and product shots stay below 1 in 1,000 pairs, while every
#: re-encoding at quality ≥ 75, ¾ and 2× resizing and EXIF orientation change is caught; 5
#: catches more crops and half-size copies but links 2.8 in 1,000 look-alike product pairs.
DEFAULT_DIFFERENCE_THRESHOLD = 4.0
#: How much larger than the threshold the difference in one of the 8×8 blocks may be.
BLOCK_FACTOR = 2.4

Kind = Literal["exact", "perceptual"]
Scope = Literal["within_P", "within_U", "between"]


@dataclass(frozen=True)
class ImageFingerprint:
    """What the duplicate search knows of one image.

    ``sha256`` of the file bytes; ``phash`` the 64-bit DCT perceptual hash (reported);
    ``thumbnail`` the oriented image on white, squashed to ``THUMBNAIL_SIDE`` squared, RGB,
    row-major uint8 bytes; ``log_aspect`` log(width / height) of the oriented image.
    """

    name: str
    sha256: str
    phash: int
    thumbnail: bytes
    log_aspect: float

    def pixels(self) -> np.ndarray:
        """The thumbnail as float64 ``[THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3]``."""
        side = THUMBNAIL_SIDE
        if len(self.thumbnail) != side * side * 3:
            raise InputError(f"{self.name}: the fingerprint's thumbnail is not {side}×{side} RGB")
        return np.frombuffer(self.thumbnail, dtype=np.uint8).reshape(side, side, 3).astype(np.float64)


@dataclass(frozen=True)
class ImageRef:
    """An image by its set, its position in that set and its name."""

    set_name: SetName
    index: int
    name: str


@dataclass(frozen=True)
class DuplicatePair:
    """Two images that are the same file (``exact``) or verified to show the same picture (``perceptual``).

    ``distance``: Hamming distance of the 64-bit perceptual hashes (reported, not decisive).
    ``difference``: the aligned pixel difference that verified the pair (RMS levels of 255,
    0 for exact duplicates). ``first`` precedes ``second`` (P before U, then by index).
    """

    kind: Kind
    scope: Scope
    first: ImageRef
    second: ImageRef
    distance: int
    difference: float = 0.0


@dataclass(frozen=True)
class DuplicateGroup:
    """Images linked by duplicate pairs (connected components), sorted P first then by index.

    ``kind`` is ``exact`` when every link in the group is exact, else ``perceptual``.
    """

    kind: Kind
    scope: Scope
    members: tuple[ImageRef, ...]


@dataclass(frozen=True)
class DuplicateReport:
    """Every duplicate pair and group found, and the thresholds of :func:`find_duplicates` used.

    ``difference_threshold`` < 0: the perceptual search was off (exact duplicates only).
    """

    pairs: tuple[DuplicatePair, ...]
    groups: tuple[DuplicateGroup, ...]
    difference_threshold: float = DEFAULT_DIFFERENCE_THRESHOLD
    candidate_distance: float = DEFAULT_CANDIDATE_DISTANCE

    @property
    def has_between_set(self) -> bool:
        """Whether an image of P also appears (or nearly) in U: an error in the owner's data."""
        return any(g.scope == "between" for g in self.groups)


@dataclass(frozen=True)
class Exclusion:
    """Positions to leave out of P and of U, sorted, with why (one line per group)."""

    p: tuple[int, ...]
    u: tuple[int, ...]
    reasons: tuple[str, ...]


def perceptual_hash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash) of an image.

    Luminance (transparency on white) resized to 32×32 with a Lanczos filter; 2-D DCT-II;
    the 8×8 lowest frequencies; bit i (row-major, most significant first) is set where the
    coefficient exceeds their median. Robust to re-encoding, resizing and mild colour or
    brightness changes; not to crops or rotations, and not discriminating enough to decide
    alone (see :func:`find_duplicates`).
    """
    grey = _rgb8(ImageOps.exif_transpose(img) or img).convert("L")
    return _phash_of(grey)


def _phash_of(grey: Image.Image) -> int:
    small = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(small, type=2, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes."""
    return int(bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1"))


def fingerprint(name: str, data: bytes, img: Image.Image | None = None) -> ImageFingerprint:
    """The fingerprint of one image file (decoded from ``data`` unless ``img`` is given)."""
    if img is None:
        from cdi.images import open_image

        img = open_image(data, name)
    oriented = _rgb8(ImageOps.exif_transpose(img) or img)
    width, height = oriented.size
    side = THUMBNAIL_SIDE
    thumb = oriented.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return ImageFingerprint(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=_phash_of(oriented.convert("L")),
        thumbnail=np.asarray(thumb, dtype=np.uint8).tobytes(),
        log_aspect=float(np.log(width / height)),
    )


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances ``[len(a), len(b)]`` of uint64 hash arrays."""
    x = a[:, None] ^ b[None, :]
    counts: np.ndarray = _POPCOUNT8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int64)
    return counts


# The verification compares two thumbnails after undoing a light crop of either: along each
# axis, image B's frame [0, 1] shows A's interval [p, 1 - q], p and q in [-MAX_CROP, MAX_CROP]
# (negative: B shows more than A there). The two axes are independent, so each is searched
# with the other fixed, coarse then fine.

_BLUR_SIGMA = 0.7  # pixels of the 32-pixel thumbnail: sub-pixel misalignment and JPEG noise fade
_MIN_OVERLAP = 0.75  # a pair whose aligned frames share less than this is not a light crop
_GAIN_RANGE = (0.85, 1.18)  # brightness changes undone: one gain, then one offset per channel
_BLOCKS = 8  # the frame is split into 8 × 8 blocks for the local difference


@lru_cache(maxsize=4)
def _sampling(side: int, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation matrices for every crop (p, q) on a grid of ``step``.

    Returns the grid values ``[g]``, the matrices ``[g, g, side, side]`` (row i of the
    resampled axis from A's pixels), validity ``[g, g, side]`` (inside A) and the index grid.
    """
    values = np.round(np.arange(-MAX_CROP, MAX_CROP + 1e-9, step), 6)
    g = len(values)
    u = (np.arange(side) + 0.5) / side
    p = values[:, None, None]
    q = values[None, :, None]
    x = p + u[None, None, :] * (1.0 - p - q)  # [g, g, side] positions in A's frame
    valid = (x >= -0.5 / side) & (x <= 1.0 + 0.5 / side)
    pos = np.clip(x * side - 0.5, 0.0, side - 1.0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, side - 1)
    w = pos - lo
    mats = np.zeros((g, g, side, side))
    ii, jj, rr = np.indices((g, g, side))
    np.add.at(mats, (ii, jj, rr, lo), 1.0 - w)
    np.add.at(mats, (ii, jj, rr, hi), w)
    return values, mats, valid, np.indices((g, g)).reshape(2, -1).T


def _prepared(pixels: np.ndarray, side: int) -> np.ndarray:
    """Blurred channels-first thumbnail ``[3, side, side]``."""
    from scipy.ndimage import gaussian_filter

    x = pixels
    if x.shape[0] != side:
        factor = x.shape[0] // side
        x = x.reshape(side, factor, side, factor, 3).mean(axis=(1, 3))
    sigma = _BLUR_SIGMA * side / THUMBNAIL_SIDE
    return np.stack([gaussian_filter(x[..., c], sigma, mode="nearest") for c in range(3)])


def _residual_ms(a: np.ndarray, b: np.ndarray, fixed: np.ndarray, fixed_valid: np.ndarray,
                 mats: np.ndarray, valid: np.ndarray, axis: str) -> np.ndarray:
    """Mean squared difference, per-channel offset removed, of B and A warped by each of ``mats``.

    ``a``, ``b`` ``[3, n, n]``; the other axis is warped by ``fixed`` ``[n, n]``; ``mats``
    ``[K, n, n]`` are the candidates along ``axis`` ("y" or "x") → ``[K]`` (inf where the
    frames overlap too little). One matrix product warps A for all K.
    """
    n = a.shape[1]
    if axis == "y":
        t = a @ fixed.T  # x warped: [3, n, n]
        warped = np.tensordot(mats, t, axes=(2, 1))  # [K, n(y), 3, n(x)]
        mask = (valid[:, :, None] & fixed_valid[None, None, :])[:, :, None, :]
        target = b.transpose(1, 0, 2)[None]  # [1, n, 3, n]
        axes: tuple[int, ...] = (1, 3)
    else:
        t = fixed @ a  # y warped: [3, n, n]
        warped = np.tensordot(t, mats, axes=(2, 2))  # [3, n(y), K, n(x)]
        mask = (fixed_valid[:, None, None] & valid[None, :, :])[None]  # [1, n, K, n]
        target = b[:, :, None, :]
        axes = (1, 3)
    diff = np.where(mask, target - warped, 0.0)
    count = mask.sum(axis=axes).reshape(-1).astype(np.float64)  # [K]
    sums = diff.sum(axis=axes)  # [K, 3] or [3, K]
    sq = (diff**2).sum(axis=axes)
    if axis == "x":
        sums, sq = sums.T, sq.T
    ss = sq.sum(axis=1) - (sums**2).sum(axis=1) / np.maximum(count, 1.0)
    ms = ss / np.maximum(3.0 * count, 1.0)
    return np.where(count >= _MIN_OVERLAP * n * n, ms, np.inf)


def _search(a: np.ndarray, b: np.ndarray, side: int, step: float, start: tuple[int, int, int, int],
            radius: int | None, rounds: int) -> tuple[int, int, int, int]:
    """Alternating search of the (py, qy, px, qx) grid indices around ``start``."""
    _, mats, valid, grid = _sampling(side, step)
    py, qy, px, qx = start
    for _ in range(rounds):
        for axis in ("y", "x"):
            c0, c1 = (py, qy) if axis == "y" else (px, qx)
            cand = grid
            if radius is not None:
                cand = grid[(np.abs(grid[:, 0] - c0) <= radius) & (np.abs(grid[:, 1] - c1) <= radius)]
            f0, f1 = (px, qx) if axis == "y" else (py, qy)
            ms = _residual_ms(a, b, mats[f0, f1], valid[f0, f1], mats[cand[:, 0], cand[:, 1]],
                              valid[cand[:, 0], cand[:, 1]], axis)
            k = int(np.argmin(ms))
            if axis == "y":
                py, qy = int(cand[k, 0]), int(cand[k, 1])
            else:
                px, qx = int(cand[k, 0]), int(cand[k, 1])
    return py, qy, px, qx


@dataclass(frozen=True)
class Alignment:
    """How two thumbnails compare once a light crop is undone.

    ``difference``: RMS difference (levels of 255) over the shared frame, after one gain and
    a per-channel offset; ``block_difference``: the largest RMS difference of the 8×8 blocks
    of the frame (a local change: an accent, a logo); ``crop``: (top, bottom, left, right),
    what of A's frame lies outside B's (negative: B shows more).
    """

    difference: float
    block_difference: float
    crop: tuple[float, float, float, float]

    def matches(self, threshold: float = DEFAULT_DIFFERENCE_THRESHOLD) -> bool:
        """The same picture: ``difference`` ≤ ``threshold`` and no block above ``BLOCK_FACTOR`` times it."""
        return self.difference <= threshold and self.block_difference <= BLOCK_FACTOR * threshold


def align(a: np.ndarray, b: np.ndarray) -> Alignment:
    """Compare thumbnails ``a`` and ``b`` (float ``[THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3]``, 0–255)."""
    n = THUMBNAIL_SIDE
    coarse_step, fine_step = 0.02, 0.01
    ca, cb = _prepared(a, n // 2), _prepared(b, n // 2)
    values_c, *_ = _sampling(n // 2, coarse_step)
    zero_c = int(np.argmin(np.abs(values_c)))
    py, qy, px, qx = _search(ca, cb, n // 2, coarse_step, (zero_c,) * 4, None, 2)
    values_f, mats, valid, _ = _sampling(n, fine_step)
    to_fine = [int(np.argmin(np.abs(values_f - values_c[i]))) for i in (py, qy, px, qx)]
    fa, fb = _prepared(a, n), _prepared(b, n)
    py, qy, px, qx = _search(fa, fb, n, fine_step, (to_fine[0], to_fine[1], to_fine[2], to_fine[3]), 1, 2)
    warped = mats[py, qy] @ fa @ mats[px, qx].T  # [3, n, n]
    mask = valid[py, qy][:, None] & valid[px, qx][None, :]
    wa = warped[:, mask]  # [3, m]
    wb = fb[:, mask]
    ca_ = wa - wa.mean(axis=1, keepdims=True)
    cb_ = wb - wb.mean(axis=1, keepdims=True)
    denom = float((ca_**2).sum())
    gain = float(np.clip((ca_ * cb_).sum() / denom, *_GAIN_RANGE)) if denom > 0 else 1.0
    resid = np.zeros_like(fb)
    fitted = gain * wa
    resid[:, mask] = wb - fitted - (wb - fitted).mean(axis=1, keepdims=True)
    difference = float(np.sqrt((resid[:, mask] ** 2).mean()))
    blocks = _BLOCKS
    bs = n // blocks
    sq = (resid**2).sum(axis=0).reshape(blocks, bs, blocks, bs).sum(axis=(1, 3))
    cnt = mask.reshape(blocks, bs, blocks, bs).sum(axis=(1, 3)) * 3.0
    block = np.where(cnt >= 0.5 * bs * bs * 3, np.sqrt(sq / np.maximum(cnt, 1.0)), 0.0)
    crop = (float(values_f[py]), float(values_f[qy]), float(values_f[px]), float(values_f[qx]))
    return Alignment(difference, float(block.max()), crop)


#: The crops (top, bottom, left, right) whose sketches are also compared, so that a copy
#: cropped by a few percent on any sides still becomes a candidate.
_SKETCH_CROPS = ((0.0, 0.0, 0.0, 0.0), (0.05, 0.05, 0.05, 0.05), (0.05, 0.0, 0.05, 0.0), (0.0, 0.05, 0.0, 0.05),
                 (0.05, 0.0, 0.0, 0.05), (0.0, 0.05, 0.05, 0.0))


def sketches(prints: Sequence[ImageFingerprint]) -> np.ndarray:
    """8×8 RGB sketches of each thumbnail and of its crops, each channel's mean removed.

    ``[len(_SKETCH_CROPS), N, 192]``: sketch 0 is the whole frame, the others the frame
    cropped by ``_SKETCH_CROPS``.
    """
    side = THUMBNAIL_SIDE
    out = np.zeros((len(_SKETCH_CROPS), len(prints), 192))
    if not prints:
        return out
    rgb = np.stack([p.pixels() for p in prints]).transpose(0, 3, 1, 2)  # [N, 3, side, side]
    for k, (top, bottom, left, right) in enumerate(_SKETCH_CROPS):
        small = _crop_matrix(side, top, bottom) @ rgb @ _crop_matrix(side, left, right).T  # [N, 3, 8, 8]
        small = small - small.mean(axis=(2, 3), keepdims=True)
        out[k] = small.reshape(len(prints), 192)
    return out


@lru_cache(maxsize=16)
def _crop_matrix(side: int, start: float, end: float) -> np.ndarray:
    """``[8, side]``: the area-average of [start, 1 - end] of an axis into 8 cells."""
    m = np.zeros((8, side))
    edges = start + (1.0 - start - end) * np.arange(9) / 8 * side
    for i in range(8):
        lo, hi = edges[i], edges[i + 1]
        for j in range(int(np.floor(lo)), min(side, int(np.ceil(hi)))):
            m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        m[i] /= m[i].sum()
    return m


def candidate_pairs(prints: Sequence[ImageFingerprint], max_distance: float = DEFAULT_CANDIDATE_DISTANCE,
                    block: int = 1024) -> np.ndarray:
    """Pairs (i < j) whose sketches lie within ``max_distance`` (RMS grey levels): ``[m, 2]``.

    The cheap first stage of :func:`find_duplicates`: the whole-frame sketch of each image is
    compared with every sketch (whole and cropped) of every other, by blocks of ``block``
    rows, with matrix products; the pair is a candidate when any comparison is close enough.
    """
    s = sketches(prints)
    n = s.shape[1]
    sq = (s**2).sum(axis=2)  # [V, N]
    aspects = np.array([p.log_aspect for p in prints])
    limit = max_distance**2 * 192
    out = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        close = np.zeros((stop - start, n), dtype=bool)
        for v in range(s.shape[0]):
            # rows' whole frame against columns' crop v, and rows' crop v against columns' whole frame
            d2 = sq[0, start:stop, None] + sq[v][None, :] - 2.0 * s[0, start:stop] @ s[v].T
            close |= d2 <= limit
            if v:
                d2 = sq[v, start:stop, None] + sq[0][None, :] - 2.0 * s[v, start:stop] @ s[0].T
                close |= d2 <= limit
        rows, cols = np.nonzero(close)
        keep = cols > rows + start
        rows, cols = rows[keep] + start, cols[keep]
        # A light crop changes the aspect ratio by at most the crop: more is another picture.
        near = np.abs(aspects[rows] - aspects[cols]) <= 3 * MAX_CROP
        out.append(np.stack([rows[near], cols[near]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.intp)


def verify(a: ImageFingerprint, b: ImageFingerprint,
           threshold: float = DEFAULT_DIFFERENCE_THRESHOLD) -> tuple[bool, float]:
    """Whether two fingerprints show the same picture: (linked, aligned difference)."""
    al = align(a.pixels(), b.pixels())
    return al.matches(threshold), al.difference


def find_duplicates(
    images_p: Sequence[ImageFingerprint],
    images_u: Sequence[ImageFingerprint],
    difference_threshold: float = DEFAULT_DIFFERENCE_THRESHOLD,
    *,
    candidate_distance: float = DEFAULT_CANDIDATE_DISTANCE,
) -> DuplicateReport:
    """Exact and perceptual duplicates within P, within U and between P and U.

    Exact: the same SHA-256. Perceptual (the files differ): the pair's 8×8 sketches lie within
    ``candidate_distance`` (:func:`candidate_pairs`), and, once a light crop of either image is
    undone, the thumbnails differ by at most ``difference_threshold`` overall and twice that in
    every block (:func:`align`). ``difference_threshold`` < 0 turns the perceptual search off.
    """
    refs = [ImageRef("P", i, f.name) for i, f in enumerate(images_p)]
    refs += [ImageRef("U", i, f.name) for i, f in enumerate(images_u)]
    prints = [*images_p, *images_u]
    n = len(prints)

    links: list[tuple[int, int, Kind, float]] = []
    by_sha: dict[str, list[int]] = {}
    for i, f in enumerate(prints):
        by_sha.setdefault(f.sha256, []).append(i)
    for members in by_sha.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1 :]:
                links.append((a, b, "exact", 0.0))
    if difference_threshold >= 0 and n > 1:
        for a, b in candidate_pairs(prints, candidate_distance).tolist():
            if prints[a].sha256 == prints[b].sha256:
                continue
            linked, difference = verify(prints[a], prints[b], difference_threshold)
            if linked:
                links.append((a, b, "perceptual", difference))
    links.sort()
    pairs = [
        DuplicatePair(kind, _scope(refs[a], refs[b]), refs[a], refs[b],
                      hamming_distance(prints[a].phash, prints[b].phash), round(diff, 3))
        for a, b, kind, diff in links
    ]

    # Connected components of the duplicate graph (union-find).
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, _, _ in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict[int, set[int]] = {}
    kinds: dict[int, set[str]] = {}
    for a, b, link_kind, _ in links:
        components.setdefault(root(a), set()).update((a, b))
        kinds.setdefault(root(a), set()).add(link_kind)
    groups = []
    for key in sorted(components):
        members = sorted(components[key])
        sets = {refs[i].set_name for i in members}
        scope: Scope = "between" if len(sets) == 2 else ("within_P" if sets == {"P"} else "within_U")
        kind: Kind = "exact" if kinds[key] == {"exact"} else "perceptual"
        groups.append(DuplicateGroup(kind, scope, tuple(refs[i] for i in members)))
    return DuplicateReport(
        pairs=tuple(pairs), groups=tuple(groups), candidate_distance=candidate_distance,
        difference_threshold=difference_threshold,
    )


def _scope(a: ImageRef, b: ImageRef) -> Scope:
    if a.set_name != b.set_name:
        return "between"
    return "within_P" if a.set_name == "P" else "within_U"


def duplicates_to_exclude(report: DuplicateReport) -> Exclusion:
    """The images to leave out of the audit.

    A group spanning P and U is left out entirely, from both sets: such an image is both
    "published" and "unpublished", which the owner must resolve. Inside one set, the group's
    first image (lowest index) is kept and the others are left out, so that no image counts
    twice.
    """
    drop_p: set[int] = set()
    drop_u: set[int] = set()
    reasons = []
    for group in report.groups:
        names = ", ".join(f"{m.set_name}[{m.index}] {m.name}" for m in group.members)
        if group.scope == "between":
            dropped = group.members
            reasons.append(f"{group.kind} duplicates across P and U, all left out: {names}")
        else:
            dropped = group.members[1:]
            reasons.append(
                f"{group.kind} duplicates within {group.members[0].set_name}, "
                f"kept {group.members[0].name}: {names}"
            )
        for m in dropped:
            (drop_p if m.set_name == "P" else drop_u).add(m.index)
    return Exclusion(p=tuple(sorted(drop_p)), u=tuple(sorted(drop_u)), reasons=tuple(reasons))


def direction_check(features_p: np.ndarray, features_u: np.ndarray) -> float:
    """One-sided p-value of "P's images have *higher* losses than U's" (less member-like).

    ``features_p`` ``[n_p, 26]`` and ``features_u`` ``[n_u, 26]``: full feature rows. The
    index is the mean of the pooled-standardised loss-type features; its direction is fixed
    by the method, not learned, so under H0 the p-value is as valid as a Welch test's.
    """
    cols = [FEATURE_NAMES.index(n) for n in DIRECTION_FEATURES]
    x = np.vstack([features_p[:, cols], features_u[:, cols]])
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    index = z.mean(axis=1)
    n_p = len(features_p)
    return float(welch_greater(index[:n_p], index[n_p:]).p_value)
