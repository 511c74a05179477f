"""Difficulty calibration of the directional test, and the shift control (method §8.2).

Published and unpublished images are seldom exchangeable: darker, flatter or simpler images
have lower denoising losses whether or not a model trained on them, so a P darker than U
can look "used" to a model that never saw either. Three pieces guard the verdict:

1. **Descriptors.** Each image, as the model sees it (its model input, at the model's
   resolution and channels), is summarised by a few model-free numbers
   (:data:`DESCRIPTOR_NAMES`): mean and spread of luminance, edge energy, the shares of
   dark and bright pixels, colourfulness and compressed bytes per pixel.
2. **The calibrated test** (:func:`cdi.assess.calibrated_test`). Every candidate statistic
   of the directional test is regressed (ridge, standardised descriptors) on U's
   descriptors, and P's and U's residuals are compared: what the descriptors cannot explain.
   Every label permutation refits on its own U, so the permutation p-value stays exact under
   exchangeability. The
   verdict's ``used`` needs both the raw and the calibrated test to reject (an
   intersection–union test, valid whenever either is): a calibration that mispredicts one
   kind of image cannot create a ``used`` the raw test would not give, nor a shift the
   descriptors explain one the calibrated test would not.
3. **The shift control** (:func:`shift_check`). Does the way P and U differ *predict* a
   lower loss for P? A fit on U's images predicts every candidate for every image, and the
   largest Welch t of P's predictions against U's is tested by permutations (each refitting
   on its own U); for a class-conditional model, a permutation chi-square test also asks
   whether P and U hold the same classes. When either is significant and the raw test fires,
   the audit is ``inconclusive``, naming the difference and what would fix it.

:data:`CALIBRATION_READS` names the features all of this reads: those the directional test
reads already, so the calibration costs no forward pass.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdi.errors import InputError
from cdi.reads import CALIBRATION_READS

__all__ = [
    "CALIBRATION_READS",
    "DEFAULT_ALPHA_SHIFT",
    "DEFAULT_RIDGE",
    "DESCRIPTOR_NAMES",
    "LAYOUT_NAMES",
    "TONE_NAMES",
    "DescriptorDifference",
    "ShiftCheckResult",
    "calibrate",
    "calibrated_statistics",
    "class_check",
    "descriptor_differences",
    "design_matrix",
    "image_descriptors",
    "shift_check",
]

#: The tone descriptors.
TONE_NAMES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "edge_energy",
    "dark_share",
    "bright_share",
    "colourfulness",
    "bytes_per_pixel",
)
#: Side of the grid whose cells' mean luminance describe the image's layout (its subject and
#: framing, coarsely: a digit 0 and a digit 7 differ there, not in their tone).
LAYOUT_GRID = 3
LAYOUT_NAMES: tuple[str, ...] = tuple(f"layout_{r}{c}" for r in range(LAYOUT_GRID) for c in range(LAYOUT_GRID))
#: The per-image descriptors, in column order: tone, then layout.
DESCRIPTOR_NAMES: tuple[str, ...] = TONE_NAMES + LAYOUT_NAMES
#: Permutations of the shift control's p-value.
SHIFT_PERMUTATIONS = 499


#: Ridge penalty on the standardised descriptors, as a multiple of the number of images.
DEFAULT_RIDGE = 0.01
#: Level of the shift control (one-sided Welch p-value of the predicted difference).
DEFAULT_ALPHA_SHIFT = 0.01

_CELLS = (("top left", "top", "top right"), ("left", "centre", "right"),
          ("bottom left", "bottom", "bottom right"))
#: How each descriptor reads in a photographer's words: (higher in P, lower in P).
_WORDS: dict[str, tuple[str, str]] = {
    **{name: ("P's images are laid out differently from U's (other subjects or framing: more light in the "
              f"{_CELLS[int(name[-2])][int(name[-1])]})",
              "P's images are laid out differently from U's (other subjects or framing: less light in the "
              f"{_CELLS[int(name[-2])][int(name[-1])]})") for name in LAYOUT_NAMES},
    "brightness": ("P's images are brighter than U's", "P's images are darker than U's"),
    "contrast": ("P's images have more contrast than U's", "P's images have less contrast than U's"),
    "edge_energy": ("P's images are sharper or busier than U's", "P's images are softer or plainer than U's"),
    "dark_share": ("P's images have more deep shadow than U's", "P's images have less deep shadow than U's"),
    "bright_share": ("P's images have more bright highlight or ink than U's",
                     "P's images have less bright highlight or ink than U's"),
    "colourfulness": ("P's images are more colourful than U's", "P's images are less colourful than U's"),
    "bytes_per_pixel": ("P's images hold more fine detail or noise than U's (they compress less)",
                        "P's images are simpler than U's (they compress better)"),
}


def image_descriptors(pixels: np.ndarray) -> np.ndarray:
    """Model-free descriptors ``[len(DESCRIPTOR_NAMES)]`` of one model input.

    ``pixels``: float ``[C, H, W]`` in [-1, 1], C = 1 or 3 (:func:`cdi.images.to_model_array`).
    Tone (:data:`TONE_NAMES`): luminance (ITU-R 601-2 for colour) in [0, 1], its mean and
    standard deviation, the mean absolute difference of neighbouring pixels (edge energy), the
    shares of pixels below 0.1 and above 0.9; Hasler–Süsstrunk colourfulness (0 for grey);
    the zlib-compressed size of the 8-bit pixels in bytes per pixel. Layout
    (:data:`LAYOUT_NAMES`): the mean luminance of each cell of a 3 × 3 grid.
    """
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] not in (1, 3) or min(x.shape[1:]) < 2:
        raise InputError(f"descriptors need a [1 or 3, H, W] image of at least 2 × 2 pixels, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("descriptors need finite pixel values")
    u = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    luma = u[0] if u.shape[0] == 1 else 0.299 * u[0] + 0.587 * u[1] + 0.114 * u[2]
    edges = 0.5 * (np.abs(np.diff(luma, axis=0)).mean() + np.abs(np.diff(luma, axis=1)).mean())
    if u.shape[0] == 3:
        rg, yb = u[0] - u[1], 0.5 * (u[0] + u[1]) - u[2]
        colour = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    else:
        colour = 0.0
    q = np.rint(u * 255.0).astype(np.uint8)
    bpp = len(zlib.compress(q.tobytes(), 9)) / float(luma.size)
    rows = np.array_split(np.arange(luma.shape[0]), LAYOUT_GRID)
    cols = np.array_split(np.arange(luma.shape[1]), LAYOUT_GRID)
    layout = [luma[np.ix_(r, c)].mean() if len(r) and len(c) else luma.mean() for r in rows for c in cols]
    tone = [luma.mean(), luma.std(), edges, (luma < 0.1).mean(), (luma > 0.9).mean(), colour, bpp]
    return np.array(tone + layout)


def _design(descriptors: np.ndarray) -> np.ndarray:
    """Standardised descriptors of the pooled images; columns without spread dropped."""
    d = np.asarray(descriptors, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] not in (len(TONE_NAMES), len(DESCRIPTOR_NAMES)):
        raise InputError(f"descriptors must be [n, {len(TONE_NAMES)}] or [n, {len(DESCRIPTOR_NAMES)}], "
                         f"got {d.shape}")
    if not np.all(np.isfinite(d)):
        raise InputError("descriptors must be finite")
    sd = d.std(axis=0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(d).max(axis=0))
    return np.asarray((d[:, keep] - d[:, keep].mean(axis=0)) / sd[keep])


def _fit(values: np.ndarray, descriptors: np.ndarray, ridge: float, rows: np.ndarray | None = None) -> np.ndarray:
    """The ridge fit's predictions ``[n, m]`` of each column of ``values`` from the descriptors.

    Fitted on ``rows`` (a boolean mask; default all), predicted for every row; the
    descriptors are standardised over all rows.
    """
    z = _design(descriptors)
    y = np.asarray(values, dtype=np.float64)
    fit = np.ones(len(y), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    mean = y[fit].mean(axis=0)
    if z.shape[1] == 0:
        return np.asarray(np.broadcast_to(mean, y.shape).copy())
    zf = z[fit] - z[fit].mean(axis=0)
    gram = zf.T @ zf + ridge * len(zf) * np.eye(z.shape[1])
    beta = np.linalg.solve(gram, zf.T @ (y[fit] - mean))
    return np.asarray(mean + (z - z[fit].mean(axis=0)) @ beta)


def design_matrix(descriptors: np.ndarray) -> np.ndarray:
    """The standardised descriptors the fits use (columns without spread dropped)."""
    return _design(descriptors)


def calibrated_statistics(values: np.ndarray, z: np.ndarray, is_p: np.ndarray,
                          ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Welch's t ``[R, m]`` (P minus U) of each candidate less its prediction from the
    descriptors ``z`` (:func:`design_matrix`) by a ridge fit on the labelling's U rows, for
    every labelling (row of ``is_p`` ``[R, n]``): the calibrated test's statistics."""
    return _shift_statistics(np.asarray(values, dtype=np.float64), z, np.asarray(is_p, dtype=bool), ridge,
                             residual=True)


def calibrate(values: np.ndarray, descriptors: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """``values`` ``[n, m]`` less what the pooled images' descriptors ``[n, d]`` predict of them.

    A label-free ridge fit per column on every descriptor, tone and layout (the layout is
    what tells a digit 0 from a 7, whose losses differ whatever the model saw); the result
    depends on the pooled rows only, not on which of them are P, and a reordering of the rows
    reorders it alike.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 2 or len(y) != len(descriptors):
        raise InputError(f"{len(y)} rows of values but {len(descriptors)} of descriptors")
    if ridge <= 0 or not math.isfinite(ridge):
        raise InputError(f"ridge must be positive, got {ridge}")
    return np.asarray(y - _fit(y, descriptors, ridge))


@dataclass(frozen=True)
class DescriptorDifference:
    """How one descriptor differs, P minus U, and its share of the predicted difference."""

    name: str
    mean_p: float
    mean_u: float
    cohens_d: float
    #: The descriptor's part of the predicted member-likeness difference (P minus U), in
    #: standard deviations of the predicted statistic; positive: it makes P look member-like.
    contribution: float
    words: str


@dataclass(frozen=True)
class ShiftCheckResult:
    """Does the way P and U differ predict that P looks more like training data?

    ``statistic``: the largest, over the candidates (``candidate`` is its column of the
    member-likeness matrix), Welch's t of the descriptors' prediction, P minus U, from a ridge
    fit on U's images; ``p_value`` its one-sided permutation p-value (H1: P predicted more
    member-like), every permutation refitting on its own U, so that it is exact under
    exchangeability. ``class_p``: for a
    class-conditional model, the permutation p-value of "P and U hold the same classes in
    the same proportions" (``None``: no classes). ``differences``: the descriptors that drive
    the prediction, largest first; ``class_words`` how the classes differ.
    """

    statistic: float
    p_value: float
    alpha_shift: float
    n_p: int
    n_u: int
    ridge: float
    differences: tuple[DescriptorDifference, ...]
    candidate: int = 0
    class_p: float | None = None
    class_words: str | None = None
    #: The seed of the permutations (the class check's too).
    random_state: int = 0

    @property
    def descriptors_shifted(self) -> bool:
        return self.p_value < self.alpha_shift

    @property
    def classes_shifted(self) -> bool:
        return self.class_p is not None and self.class_p < self.alpha_shift

    @property
    def shifted(self) -> bool:
        return self.descriptors_shifted or self.classes_shifted

    def words(self, limit: int = 2) -> str:
        """How P and U differ, in a photographer's words (the leading differences)."""
        leading = [d.words for d in self.differences if d.contribution > 0][:limit]
        if self.classes_shifted and self.class_words:
            leading = [self.class_words, *leading][:limit] if self.descriptors_shifted else [self.class_words]
        return "; ".join(leading) if leading else "no single property stands out"


def _welch_greater(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy import stats as sps

    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return 0.0, 1.0
    t = float((a.mean() - b.mean()) / se)
    df = (va + vb) ** 2 / ((va**2) / (len(a) - 1) + (vb**2) / (len(b) - 1))
    return t, float(sps.t.sf(t, df))


def shift_check(
    member_likeness: np.ndarray, descriptors: np.ndarray, n_p: int, *,
    alpha_shift: float = DEFAULT_ALPHA_SHIFT, ridge: float = DEFAULT_RIDGE,
    classes: Sequence[Any] | None = None, random_state: int = 0,
) -> ShiftCheckResult:
    """The shift control on the pooled images (P's ``n_p`` rows first).

    ``member_likeness`` ``[n]`` or ``[n, m]``: statistics per image, larger meaning more
    member-like (the test's candidates); ``descriptors`` ``[n, d]``; ``classes``: each
    image's class, for a class-conditional model (their check draws 999 permutations from
    ``random_state``). The ridge fit learns how the
    descriptors predict the statistic on U's images only (which the model cannot have seen),
    then predicts it for every image: a fit on both sets would learn P's membership signal
    along whatever descriptor happens to differ between the sets, and report it as a shift.
    """
    ys = np.asarray(member_likeness, dtype=np.float64)
    ys = ys[:, None] if ys.ndim == 1 else ys
    d = np.asarray(descriptors, dtype=np.float64)
    n = len(ys)
    if len(d) != n or not 2 <= n_p <= n - 2:
        raise InputError(f"the shift control needs at least 2 images per set and one descriptor row each "
                         f"(got {n} values, {len(d)} rows, P = {n_p})")
    if not 0.0 < alpha_shift < 1.0:
        raise InputError(f"alpha_shift must lie strictly between 0 and 1, got {alpha_shift}")
    z = _design(d)
    observed = _shift_statistics(ys, z, (np.arange(n) < n_p)[None, :], ridge)[0]
    best = int(np.argmax(observed))
    t = float(observed[best])
    rng = np.random.default_rng([random_state, 7])
    labels = rng.permuted(np.broadcast_to(np.arange(n), (SHIFT_PERMUTATIONS, n)), axis=1) < n_p
    permuted = _shift_statistics(ys, z, labels, ridge).max(axis=1)
    p = float((1 + np.sum(permuted >= t - 1e-9 * max(1.0, abs(t)))) / (1 + SHIFT_PERMUTATIONS))
    class_p = class_words = None
    if classes is not None:
        if len(classes) != n:
            raise InputError(f"{len(classes)} classes for {n} images")
        class_p, class_words = class_check(classes, n_p, random_state)
    return ShiftCheckResult(t, p, alpha_shift, n_p, n - n_p, ridge,
                            descriptor_differences(ys[:, best], d, n_p, ridge), best, class_p, class_words,
                            random_state)


def _shift_statistics(y: np.ndarray, z: np.ndarray, is_p: np.ndarray, ridge: float,
                      residual: bool = False) -> np.ndarray:
    """Welch's t ``[R, m]`` (P minus U) of each candidate's prediction from a ridge fit on U's rows
    (``residual``: of the candidate less that prediction), refitted for every labelling (row of
    ``is_p`` ``[R, n]``)."""
    n, k = z.shape
    z1 = np.hstack([np.ones((n, 1)), z])
    penalty = np.eye(k + 1)
    penalty[0, 0] = 0.0
    out = []
    for start in range(0, len(is_p), 128):
        lab = is_p[start:start + 128]
        w = (~lab).astype(np.float64)
        n_u = w.sum(axis=1)
        gram = np.einsum("bi,ij,il->bjl", w, z1, z1) + ridge * n_u[:, None, None] * penalty
        rhs = np.einsum("bi,ij,im->bjm", w, z1, y)
        beta = np.linalg.solve(gram, rhs)
        pred = np.einsum("ij,bjm->bim", z1, beta)  # [b, n, m]
        if residual:
            pred = y[None, :, :] - pred
        g = lab.astype(np.float64)[:, :, None]
        n_a, n_b = g.sum(axis=1), (1 - g).sum(axis=1)
        mean_a = (g * pred).sum(axis=1) / n_a
        mean_b = ((1 - g) * pred).sum(axis=1) / n_b
        var_a = (g * (pred - mean_a[:, None, :]) ** 2).sum(axis=1) / (n_a - 1)
        var_b = ((1 - g) * (pred - mean_b[:, None, :]) ** 2).sum(axis=1) / (n_b - 1)
        se = np.sqrt(var_a / n_a + var_b / n_b)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(se > 1e-12, (mean_a - mean_b) / np.where(se > 0, se, 1.0), 0.0))
    return np.vstack(out)


def class_check(classes: Sequence[Any], n_p: int, random_state: int = 0,
                n_permutations: int = 999) -> tuple[float, str]:
    """Do P (the first ``n_p``) and U hold the same classes in the same proportions?

    The chi-square statistic of the set-by-class table, its p-value from label permutations
    (exact under exchangeability), and the difference in words.
    """
    keys = [str(c) for c in classes]
    levels = sorted(set(keys))
    codes = np.array([levels.index(k) for k in keys])
    n = len(codes)
    onehot = np.eye(len(levels))[codes]  # [n, c]
    total = onehot.sum(axis=0)

    def chi2(is_p: np.ndarray) -> np.ndarray:
        k = is_p.sum(axis=1, keepdims=True).astype(np.float64)
        obs_p = is_p.astype(np.float64) @ onehot
        obs_u = total - obs_p
        exp_p, exp_u = k * total / n, (n - k) * total / n
        return np.asarray((((obs_p - exp_p) ** 2 / exp_p) + ((obs_u - exp_u) ** 2 / exp_u)).sum(axis=1))

    rng = np.random.default_rng([random_state, 5])
    observed = float(chi2((np.arange(n) < n_p)[None, :])[0])
    perms = rng.permuted(np.broadcast_to(np.arange(n), (n_permutations, n)), axis=1) < n_p
    p = float((1 + np.sum(chi2(perms) >= observed - 1e-9 * max(1.0, observed))) / (1 + n_permutations))
    share_p = onehot[:n_p].mean(axis=0)
    share_u = onehot[n_p:].mean(axis=0)
    more = [levels[j] for j in np.argsort(share_u - share_p)[:3] if share_p[j] > share_u[j]]
    fewer = [levels[j] for j in np.argsort(share_p - share_u)[:3] if share_u[j] > share_p[j]]
    words = ("P and U hold different classes (more of " + ", ".join(more or ["none"]) + " in P; more of "
             + ", ".join(fewer or ["none"]) + " in U)")
    return p, words


def _u_fit_parts(y: np.ndarray, d: np.ndarray, n_p: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Standardised descriptors (over all rows) and the ridge coefficients fitted on U's rows."""
    z = _design(d)
    u = z[n_p:] - z[n_p:].mean(axis=0)
    yu = y[n_p:] - y[n_p:].mean()
    beta = np.linalg.solve(u.T @ u + ridge * len(u) * np.eye(z.shape[1]), u.T @ yu)
    return z, beta


def descriptor_differences(
    member_likeness: np.ndarray, descriptors: np.ndarray, n_p: int, ridge: float = DEFAULT_RIDGE,
) -> tuple[DescriptorDifference, ...]:
    """Each descriptor's difference between P and U and its part in the predicted difference."""
    y = np.asarray(member_likeness, dtype=np.float64).reshape(-1)
    d = np.asarray(descriptors, dtype=np.float64)
    sd = d.std(axis=0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(d).max(axis=0))
    z = (d[:, keep] - d[:, keep].mean(axis=0)) / np.where(sd[keep] > 0, sd[keep], 1.0)
    spread = y.std()
    out = []
    if z.shape[1] and spread > 0:
        _, beta = _u_fit_parts(y, d, n_p, ridge)
        gap = z[:n_p].mean(axis=0) - z[n_p:].mean(axis=0)
        parts = beta * gap / spread
    else:
        parts = np.zeros(int(keep.sum()))
    for k, j in enumerate(np.flatnonzero(keep)):
        name = DESCRIPTOR_NAMES[j]
        a, b = d[:n_p, j], d[n_p:, j]
        pooled = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if n_p > 1 and len(b) > 1 else 0.0
        cd = float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0
        words = _WORDS[name][0 if a.mean() > b.mean() else 1]
        out.append(DescriptorDifference(name, float(a.mean()), float(b.mean()), cd, float(parts[k]), words))
    out.sort(key=lambda x: -x.contribution)
    return tuple(out)
