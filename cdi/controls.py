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
    Exact (SHA-256 of the file bytes) and perceptual (64-bit DCT hash, :func:`perceptual_hash`)
    duplicates within P, within U and between them (:func:`find_duplicates`), and the images
    to leave out (:func:`duplicates_to_exclude`): every image of a group that spans P and U,
    and all but the first image of a group inside one set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn

from cdi.errors import InputError

# The colour-mode conversion the models' inputs go through; reused, not copied.
from cdi.images import _to_8bit
from cdi.scoring import validate_features
from cdi.stats import (
    DEFAULT_ALPHA,
    DEFAULT_N_FOLDS,
    DEFAULT_N_PERMUTATIONS,
    DEFAULT_PROTOCOL,
    Protocol,
    ProtocolOptions,
    ProtocolResult,
    auc,
    check_sizes,
    cohens_d,
    crossfit_replicates,
    permutation_p_value,
    resolve_seed,
    run_test,
)

__all__ = [
    "DEFAULT_HAMMING_THRESHOLD",
    "IMAGE_STATISTIC_NAMES",
    "DistributionCheckResult",
    "DuplicateGroup",
    "DuplicatePair",
    "DuplicateReport",
    "Exclusion",
    "ImageFingerprint",
    "ImageRef",
    "NegativeControlResult",
    "StatisticDifference",
    "distribution_check",
    "duplicates_to_exclude",
    "find_duplicates",
    "fingerprint",
    "hamming_distance",
    "image_statistics",
    "negative_control",
    "perceptual_hash",
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

#: Largest Hamming distance between two 64-bit perceptual hashes that counts as a
#: near-duplicate. Measured (this implementation): JPEG re-encoding (quality 30–75),
#: 2× resizing, Gaussian blur (radius 1) and +10 brightness move a hash by ≤ 4 bits on
#: scikit-learn's digits and ≤ 2 on its sample photographs; distinct photographs lie ~30
#: bits apart; of the 1.6 M pairs of distinct digits, 73 lie within 4 bits (all the same
#: digit, drawn almost alike) and 404 within 6.
DEFAULT_HAMMING_THRESHOLD = 4

Kind = Literal["exact", "perceptual"]
Scope = Literal["within_P", "within_U", "between"]


@dataclass(frozen=True)
class ImageFingerprint:
    """An image's name, SHA-256 of its file bytes and 64-bit perceptual hash."""

    name: str
    sha256: str
    phash: int


@dataclass(frozen=True)
class ImageRef:
    """An image by its set, its position in that set and its name."""

    set_name: SetName
    index: int
    name: str


@dataclass(frozen=True)
class DuplicatePair:
    """Two images that are the same file (``exact``) or look the same (``perceptual``).

    ``distance``: Hamming distance of the perceptual hashes (0 for exact duplicates, which
    are reported only as exact). ``first`` precedes ``second`` (P before U, then by index).
    """

    kind: Kind
    scope: Scope
    first: ImageRef
    second: ImageRef
    distance: int


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
    """Every duplicate pair and group found, and the threshold used."""

    pairs: tuple[DuplicatePair, ...]
    groups: tuple[DuplicateGroup, ...]
    hamming_threshold: int

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
    brightness changes; not to crops or rotations.
    """
    grey = _rgb8(ImageOps.exif_transpose(img) or img).convert("L")
    small = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(small, type=2, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes."""
    return int(bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1"))


def fingerprint(name: str, data: bytes, img: Image.Image | None = None) -> ImageFingerprint:
    """SHA-256 of ``data`` and the perceptual hash of the image (decoded from ``data`` unless given)."""
    if img is None:
        from cdi.images import open_image

        img = open_image(data, name)
    return ImageFingerprint(name=name, sha256=hashlib.sha256(data).hexdigest(), phash=perceptual_hash(img))


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances ``[len(a), len(b)]`` of uint64 hash arrays."""
    x = a[:, None] ^ b[None, :]
    return _POPCOUNT8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int64)


def find_duplicates(
    images_p: Sequence[ImageFingerprint],
    images_u: Sequence[ImageFingerprint],
    hamming_threshold: int = DEFAULT_HAMMING_THRESHOLD,
) -> DuplicateReport:
    """Exact and perceptual duplicates within P, within U and between P and U.

    Two images are exact duplicates when their SHA-256 match, perceptual duplicates when
    their perceptual hashes differ in at most ``hamming_threshold`` of 64 bits (and the files
    differ). ``hamming_threshold`` < 0 turns the perceptual search off.
    """
    if hamming_threshold > 64:
        raise InputError(f"hamming_threshold must be at most 64, got {hamming_threshold}")
    refs = [ImageRef("P", i, f.name) for i, f in enumerate(images_p)]
    refs += [ImageRef("U", i, f.name) for i, f in enumerate(images_u)]
    prints = [*images_p, *images_u]
    n = len(prints)
    hashes = np.array([f.phash & 0xFFFFFFFFFFFFFFFF for f in prints], dtype=np.uint64)

    pairs: list[DuplicatePair] = []
    links: list[tuple[int, int, Kind]] = []
    by_sha: dict[str, list[int]] = {}
    for i, f in enumerate(prints):
        by_sha.setdefault(f.sha256, []).append(i)
    for members in by_sha.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1 :]:
                links.append((a, b, "exact"))
    if hamming_threshold >= 0 and n > 1:
        block = 512
        for start in range(0, n, block):
            dist = _hamming_matrix(hashes[start : start + block], hashes)
            rows, cols = np.nonzero(dist <= hamming_threshold)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                a = start + r
                if c > a and prints[a].sha256 != prints[c].sha256:
                    links.append((a, c, "perceptual"))
    links.sort()
    for a, b, link_kind in links:
        distance = hamming_distance(int(hashes[a]), int(hashes[b]))
        pairs.append(DuplicatePair(link_kind, _scope(refs[a], refs[b]), refs[a], refs[b], distance))

    # Connected components of the duplicate graph (union-find).
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, _ in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict[int, list[int]] = {}
    for a, b, _ in links:
        for i in (a, b):
            members = components.setdefault(root(i), [])
            if i not in members:
                members.append(i)
    kinds: dict[int, set[str]] = {}
    for a, _b, link_kind in links:
        kinds.setdefault(root(a), set()).add(link_kind)
    groups = []
    for key in sorted(components):
        members = sorted(components[key])
        sets = {refs[i].set_name for i in members}
        scope: Scope = "between" if len(sets) == 2 else ("within_P" if sets == {"P"} else "within_U")
        kind: Kind = "exact" if kinds[key] == {"exact"} else "perceptual"
        groups.append(DuplicateGroup(kind, scope, tuple(refs[i] for i in members)))
    return DuplicateReport(pairs=tuple(pairs), groups=tuple(groups), hamming_threshold=hamming_threshold)


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
