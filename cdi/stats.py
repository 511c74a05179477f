"""The statistical test of an audit (method §6): do P's images score higher than U's?

Two protocols, both one-sided (H1: P scores higher than U):

``reference``
    The published protocol, made one-sided. P and U are each split at random into a fitting
    part (``fit_fraction``, default 0.5) and a test part; the scoring model
    (:mod:`cdi.scoring`) is fitted on the fitting parts, the test parts are scored, and
    Welch's t-test compares the scores (``welch_greater``). Its p-value is exact only as
    far as Welch's normal approximation holds for the scores.

``crossfit``
    Every image is used for testing. The pooled images are dealt into K folds (default 5)
    stratified by set; each fold is scored by a model fitted on the other K − 1 folds, so
    every image is scored exactly once by a scorer that never saw it. The statistic is
    Welch's t of the pooled out-of-fold scores (P minus U). Because those scores are not
    independent, the p-value comes from a permutation test that reruns the *whole*
    procedure (label shuffle, fold assignment, K fits, scoring) ``n_permutations`` times
    (default 999): p = (1 + #{permuted t ≥ observed t}) / (1 + n_permutations). Under H0
    ("not trained on P") the images are exchangeable between P and U, so this p-value is
    exact (never below its nominal level), whatever the scores' distribution.

Why Welch's t rather than the plain difference of means as the cross-fitted statistic: under
exchangeability any statistic gives an exact permutation test, but the studentised one stays
asymptotically valid when P and U differ in spread but not in mean (Janssen 1997; Chung &
Romano 2013), which the raw difference does not when the sets have different sizes. It is
also the reference protocol's statistic, so the two protocols' statistics read alike.

Every function is pure: randomness comes from ``random_state`` (an int seed; ``None``
draws a fresh seed, which the result records so that the run can be repeated). Results are
frozen dataclasses carrying the per-image scores, from which :func:`recompute` rebuilds the
test without the features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy import stats as sps

from cdi.errors import InputError
from cdi.options import (
    DEFAULT_ALPHA,
    DEFAULT_PROTOCOL,
    MIN_CROSSFIT_PER_FOLD,
    MIN_CROSSFIT_SET,
    MIN_REFERENCE_PART,
    Protocol,
    ProtocolOptions,
    check_alpha,
    fit_count,
    minimum_set_size,
    minimum_sizes,
    protocol_of,
)
from cdi.scoring import batched_fit_predict, fit_scoring_model, score, validate_features

__all__ = [
    "CrossfitReplicates",
    "Direction",
    "ProtocolResult",
    "RecomputedTest",
    "ScoredImage",
    "SequentialPValue",
    "WelchResult",
    "auc",
    "candidate_matrix",
    "check_sizes",
    "cohens_d",
    "crossfit_replicates",
    "crossfit_test",
    "directional_test",
    "permutation_p_value",
    "recompute",
    "reference_test",
    "resolve_seed",
    "run_test",
    "sequential_permutation_p_value",
    "welch_greater",
    "welch_t_columns",
    "welch_t_rows",
]

Direction = Literal["P>U", "P<U", "P=U"]
SetName = Literal["P", "U"]
Role = Literal["fit", "test"]


class WelchResult(NamedTuple):
    """Welch's unequal-variance t-test: statistic, Welch–Satterthwaite df, one-sided p-value."""

    statistic: float
    df: float
    p_value: float


@dataclass(frozen=True)
class ScoredImage:
    """One image's part in a test.

    ``index`` is the image's position in its set (P or U as given to the test); ``role`` is
    ``"test"`` for an image whose score enters the statistic, ``"fit"`` for one that only
    fitted the scorer (reference protocol; its ``score`` is ``None``). ``fold`` is the
    cross-fitted fold that scored the image (``None`` in the reference protocol).
    """

    set_name: SetName
    index: int
    role: Role
    fold: int | None
    score: float | None


@dataclass(frozen=True)
class ProtocolResult:
    """The outcome of one protocol run (the audit's test, or a negative control's).

    ``statistic`` is Welch's t of the test scores, P minus U; ``df`` its Welch–Satterthwaite
    degrees of freedom (reference), ``None`` for the permutation test. ``p_value`` is
    one-sided (``alternative`` = "greater": H1 is "P scores higher"); ``direction`` is the
    observed sign. ``auc`` (P test scores vs U test scores, ties count one half) and
    ``cohens_d`` (pooled standard deviation) are effect sizes. ``n_fit_*`` and ``n_test_*``
    count the images of each set that fitted a scorer and whose score entered the test (in
    the cross-fitted protocol every image does both, in different folds). ``random_state``
    is the seed actually used. ``rows`` holds one :class:`ScoredImage` per image, P first.
    """

    protocol: Protocol
    statistic_name: str
    statistic: float
    df: float | None
    p_value: float
    alternative: Literal["greater"]
    direction: Direction
    auc: float
    cohens_d: float
    mean_score_p: float
    mean_score_u: float
    n_p: int
    n_u: int
    n_fit_p: int
    n_fit_u: int
    n_test_p: int
    n_test_u: int
    alpha: float
    fit_fraction: float | None
    n_folds: int | None
    n_permutations: int | None
    random_state: int
    rows: tuple[ScoredImage, ...]
    selected_column: int | None = None
    exceedances: int | None = None
    max_permutations: int | None = None

    @classmethod
    def of_scores(cls, sp: np.ndarray, su: np.ndarray, **fields: Any) -> ProtocolResult:
        """The result whose test scores are ``sp`` (P) and ``su`` (U): the direction, effect
        sizes, mean scores and test counts follow from them and ``fields["statistic"]``."""
        return cls(
            alternative="greater", direction=_direction(fields["statistic"]), auc=auc(sp, su),
            cohens_d=cohens_d(sp, su), mean_score_p=float(sp.mean()), mean_score_u=float(su.mean()),
            n_test_p=len(sp), n_test_u=len(su), **fields,
        )

    @property
    def significant(self) -> bool:
        """Whether p < α (one-sided: only "P scores higher" can be significant)."""
        return self.p_value < self.alpha

    @property
    def p_value_floor(self) -> float | None:
        """The smallest p-value this run could have given (``None``: a parametric p-value)."""
        if self.protocol is Protocol.DIRECTIONAL and self.max_permutations is not None:
            return 1.0 / (1 + self.max_permutations)
        if self.n_permutations is not None:
            return 1.0 / (1 + self.n_permutations)
        return None


@dataclass(frozen=True)
class RecomputedTest:
    """A test rebuilt from per-image scores alone (see :func:`recompute`)."""

    statistic: float
    df: float | None
    p_value: float | None


@dataclass(frozen=True)
class CrossfitReplicates:
    """Out-of-fold scores of the observed labelling (row 0) and of each permutation.

    ``scores`` ``[R, n]``: the score of pooled image i (P first, then U) in replicate r;
    ``is_p`` ``[R, n]``: whether image i plays P in replicate r (row 0: the true sets);
    ``folds`` ``[R, n]``: the fold that scored it. R = 1 + n_permutations.
    """

    scores: np.ndarray
    is_p: np.ndarray
    folds: np.ndarray


# --- small statistics -------------------------------------------------------------------


def welch_greater(a: np.ndarray, b: np.ndarray) -> WelchResult:
    """One-sided Welch test of H1 mean(a) > mean(b); ``a`` ``[n_a]``, ``b`` ``[n_b]``, n ≥ 2 each.

    Identical to ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative="greater")``.
    """
    xa = _sample(a, "a")
    xb = _sample(b, "b")
    res = sps.ttest_ind(xa, xb, equal_var=False, alternative="greater")
    return WelchResult(float(res.statistic), float(res.df), float(res.pvalue))


def welch_t_rows(scores: np.ndarray, is_p: np.ndarray) -> np.ndarray:
    """Welch's t (P minus U) of each row: ``scores`` and ``is_p`` ``[R, n]`` → ``[R]``.

    Where both groups have zero variance, t is 0 for equal means and ±inf otherwise (instead
    of NaN), so that a permutation count never silently skips a replicate.
    """
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(is_p, dtype=bool)
    n_a = g.sum(axis=1)
    n_b = (~g).sum(axis=1)
    mean_a = np.where(g, s, 0.0).sum(axis=1) / n_a
    mean_b = np.where(g, 0.0, s).sum(axis=1) / n_b
    var_a = np.where(g, (s - mean_a[:, None]) ** 2, 0.0).sum(axis=1) / (n_a - 1)
    var_b = np.where(g, 0.0, (s - mean_b[:, None]) ** 2).sum(axis=1) / (n_b - 1)
    diff = mean_a - mean_b
    se = np.sqrt(var_a / n_a + var_b / n_b)
    safe_se = np.where(se > 0, se, 1.0)
    degenerate = np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0))
    return np.where(se > 0, diff / safe_se, degenerate).astype(np.float64)


def auc(scores_p: np.ndarray, scores_u: np.ndarray) -> float:
    """Area under the ROC curve of ``scores_p`` ``[n_p]`` (positives) vs ``scores_u`` ``[n_u]``.

    The Mann–Whitney U of P over U divided by n_p·n_u; ties count one half.
    """
    sp = np.asarray(scores_p, dtype=np.float64).ravel()
    su = np.asarray(scores_u, dtype=np.float64).ravel()
    ranks = sps.rankdata(np.r_[sp, su])
    u = ranks[: sp.size].sum() - sp.size * (sp.size + 1) / 2.0
    return float(u / (sp.size * su.size))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean(a) − mean(b)) / pooled standard deviation (ddof 1); ±inf or 0 if that is 0.

    Differences and spreads within rounding of the values' size count as zero: the mean of
    copies of one number is not always exactly that number, and a constant column must not
    read as an effect.
    """
    xa = np.asarray(a, dtype=np.float64).ravel()
    xb = np.asarray(b, dtype=np.float64).ravel()
    diff = float(xa.mean() - xb.mean())
    pooled = ((xa.size - 1) * xa.var(ddof=1) + (xb.size - 1) * xb.var(ddof=1)) / (xa.size + xb.size - 2)
    rounding = 64.0 * np.finfo(np.float64).eps * float(max(np.abs(xa).max(), np.abs(xb).max()))
    if math.sqrt(max(pooled, 0.0)) <= rounding:
        return 0.0 if abs(diff) <= rounding else math.copysign(math.inf, diff)
    return diff / math.sqrt(pooled)


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """Monte Carlo permutation p-value, H1 "greater": (1 + #{null ≥ observed}) / (1 + len(null)).

    A permuted statistic within a relative 100·eps of the observed one counts as a tie (≥),
    as in ``scipy.stats.permutation_test``, so that rounding never turns a tie into a win.
    NaN statistics count as ≥ (conservative).
    """
    z = np.asarray(null, dtype=np.float64).ravel()
    if z.size == 0:
        raise InputError("a permutation test needs at least one permuted statistic")
    gamma = abs(observed) * 100.0 * np.finfo(np.float64).eps
    at_least = (z >= observed - gamma) | np.isnan(z)
    return float((1 + int(at_least.sum())) / (1 + z.size))


def _direction(statistic: float) -> Direction:
    if statistic > 0:
        return "P>U"
    if statistic < 0:
        return "P<U"
    return "P=U"


def _sample(values: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise InputError(f"sample {name} needs at least 2 values, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"sample {name} holds a non-finite value at position {int(np.argmin(np.isfinite(x)))}")
    return x


# --- sizes and seeds --------------------------------------------------------------------


def resolve_seed(random_state: int | None) -> int:
    """The seed to use: ``random_state`` itself, or a fresh one from the OS when ``None``."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise InputError(f"random_state must be an int or None, got {type(random_state).__name__}")
    if random_state < 0:
        raise InputError(f"random_state must be non-negative, got {random_state}")
    return int(random_state)


def check_sizes(
    n_p: int,
    n_u: int,
    protocol: Protocol | str,
    options: ProtocolOptions | None = None,
    *,
    negative_control: bool = True,
) -> None:
    """Raise :class:`InputError` if P (``n_p`` images) or U (``n_u``) is too small for ``protocol``.

    Meant to run before any feature is computed. With ``negative_control`` (the default, as
    an audit always runs it) U must also split into two halves that each satisfy the
    minimum, i.e. hold about twice :func:`minimum_set_size`.
    """
    proto = protocol_of(protocol)
    opts = options or ProtocolOptions()
    minimum = minimum_set_size(proto, opts)
    sizes = minimum_sizes(proto, opts, negative_control=negative_control)
    if proto is Protocol.DIRECTIONAL:
        why = f"the directional protocol needs at least {minimum} images per set"
    elif proto is Protocol.REFERENCE:
        why = (
            f"the reference protocol with fit fraction {opts.fit_fraction} needs at least {minimum} "
            f"images per set, so that each set's fitting and test parts hold at least "
            f"{MIN_REFERENCE_PART} images"
        )
    else:
        why = (
            f"the cross-fitted protocol with {opts.n_folds} folds needs at least {minimum} images "
            f"per set (at least {MIN_CROSSFIT_SET}, and {MIN_CROSSFIT_PER_FOLD} per fold)"
        )
    problems = []
    if n_p < minimum:
        problems.append(f"P holds {n_p} images")
    if n_u < minimum:
        problems.append(f"U holds {n_u} images")
    if problems:
        raise InputError(f"{' and '.join(problems)}, but {why}")
    if n_u < sizes.u:
        raise InputError(
            f"U holds {n_u} images, but the negative control splits U into two halves that are "
            f"tested like P and U, and {why}: U needs at least {sizes.u} images"
        )


def _features(features_p: np.ndarray, features_u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xp = validate_features(features_p, "P features")
    xu = validate_features(features_u, "U features")
    if xp.shape[1] != xu.shape[1]:
        raise InputError(f"P has {xp.shape[1]} feature columns but U has {xu.shape[1]}")
    pooled = np.vstack([xp, xu])
    if np.all(pooled == pooled[0]):
        raise InputError("every image has the same features: there is nothing to test")
    return xp, xu



# --- the protocols ----------------------------------------------------------------------


def reference_test(
    features_p: np.ndarray,
    features_u: np.ndarray,
    options: ProtocolOptions | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    random_state: int | None = None,
) -> ProtocolResult:
    """The reference protocol, one-sided: split, fit, score, Welch's t-test.

    ``features_p`` ``[n_p, k]``, ``features_u`` ``[n_u, k]``: the selected feature columns
    of P's and U's images. Uses ``options.fit_fraction``. Raises :class:`InputError` for too
    small sets (see :func:`check_sizes`; the negative control's needs are not checked here),
    non-finite features, or test scores without any spread.
    """
    alpha = check_alpha(alpha)
    opts = options or ProtocolOptions()
    xp, xu = _features(features_p, features_u)
    n_p, n_u = len(xp), len(xu)
    check_sizes(n_p, n_u, Protocol.REFERENCE, opts, negative_control=False)
    seed = resolve_seed(random_state)
    rng = np.random.default_rng(seed)
    parts = []
    for n in (n_p, n_u):
        order = rng.permutation(n)
        n_fit = fit_count(n, opts.fit_fraction)
        parts.append((np.sort(order[:n_fit]), np.sort(order[n_fit:])))
    (fit_p, test_p), (fit_u, test_u) = parts
    model = fit_scoring_model(xp[fit_p], xu[fit_u], random_state=seed)
    sp = score(model, xp[test_p])
    su = score(model, xu[test_u])
    t, df, p = welch_greater(sp, su)
    if not math.isfinite(t):
        raise InputError("the test parts' scores have no spread: Welch's test is undefined")

    rows: list[ScoredImage] = []
    sides: tuple[tuple[SetName, int, np.ndarray, np.ndarray], ...] = (
        ("P", n_p, test_p, sp),
        ("U", n_u, test_u, su),
    )
    for set_name, n, test_idx, scores in sides:
        by_index = dict(zip(test_idx.tolist(), scores.tolist(), strict=True))
        for i in range(n):
            if i in by_index:
                rows.append(ScoredImage(set_name, i, "test", None, by_index[i]))
            else:
                rows.append(ScoredImage(set_name, i, "fit", None, None))
    return ProtocolResult.of_scores(
        sp, su,
        protocol=Protocol.REFERENCE,
        statistic_name="welch_t",
        statistic=t,
        df=df,
        p_value=p,
        n_p=n_p,
        n_u=n_u,
        n_fit_p=len(fit_p),
        n_fit_u=len(fit_u),
        alpha=alpha,
        fit_fraction=opts.fit_fraction,
        n_folds=None,
        n_permutations=None,
        random_state=seed,
        rows=tuple(rows),
    )


def crossfit_replicates(
    features: np.ndarray,
    n_p: int,
    n_folds: int,
    n_permutations: int,
    random_state: int,
) -> CrossfitReplicates:
    """Cross-fitted out-of-fold scores for the true labelling and ``n_permutations`` shuffles.

    ``features`` ``[n, k]``: P's rows first (``n_p`` of them), then U's. Replicate 0 uses the
    true sets; each further replicate draws a uniformly random relabelling. In every
    replicate the rows are ordered at random within each set, P first, and dealt round-robin
    into ``n_folds`` folds (stratified: each set spread evenly over the folds), and each
    fold is scored by a model (:mod:`cdi.scoring`) fitted on the other folds. Replicate 0
    and the permuted replicates are thus drawn by the same mechanism, which is what makes the
    permutation p-value exact under exchangeability. Depends only on the arguments.
    """
    x = validate_features(features)
    n = x.shape[0]
    n_u = n - n_p
    if n_p < n_folds or n_u < n_folds:
        raise InputError(f"each set needs at least {n_folds} images for {n_folds} folds")
    rng = np.random.default_rng(random_state)
    n_rep = 1 + n_permutations
    orders = np.empty((n_rep, n), dtype=np.intp)
    orders[0] = np.r_[rng.permutation(n_p), n_p + rng.permutation(n_u)]
    if n_permutations:
        orders[1:] = rng.permuted(np.broadcast_to(np.arange(n), (n_permutations, n)), axis=1)
    # Position r of an order plays P when r < n_p and lands in fold r mod K.
    is_p = np.empty((n_rep, n), dtype=bool)
    folds = np.empty((n_rep, n), dtype=np.intp)
    np.put_along_axis(is_p, orders, np.broadcast_to(np.arange(n) < n_p, (n_rep, n)), axis=1)
    np.put_along_axis(folds, orders, np.broadcast_to(np.arange(n) % n_folds, (n_rep, n)), axis=1)

    scores = np.empty((n_rep, n))
    fold_ids = np.arange(n_folds)
    # Replicates go to the solver in blocks, bounding memory at a few million entries.
    block = max(1, 2_000_000 // (n_folds * n))
    for start in range(0, n_rep, block):
        stop = min(n_rep, start + block)
        f = folds[start:stop]  # [b, n]
        fit = (f[:, None, :] != fold_ids[None, :, None]).reshape(-1, n)  # [b*K, n]
        labels = np.repeat(is_p[start:stop], n_folds, axis=0)
        proba = batched_fit_predict(x, labels, fit).reshape(stop - start, n_folds, n)
        scores[start:stop] = np.take_along_axis(proba, f[:, None, :], axis=1)[:, 0, :]
    return CrossfitReplicates(scores=scores, is_p=is_p, folds=folds)


def crossfit_test(
    features_p: np.ndarray,
    features_u: np.ndarray,
    options: ProtocolOptions | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    random_state: int | None = None,
) -> ProtocolResult:
    """The cross-fitted protocol with its permutation test (see the module docstring).

    ``features_p`` ``[n_p, k]``, ``features_u`` ``[n_u, k]``. Uses ``options.n_folds`` and
    ``options.n_permutations``; raises :class:`InputError` if 1 / (1 + n_permutations) ≥ α
    (the test could never be significant), for too small sets or non-finite features.
    """
    alpha = check_alpha(alpha)
    opts = options or ProtocolOptions()
    if 1.0 / (1 + opts.n_permutations) >= alpha:
        raise InputError(
            f"with {opts.n_permutations} permutations the smallest p-value is "
            f"{1.0 / (1 + opts.n_permutations):.4g}, never below α = {alpha}: use at least "
            f"{math.ceil(1.0 / alpha)} permutations"
        )
    xp, xu = _features(features_p, features_u)
    n_p, n_u = len(xp), len(xu)
    check_sizes(n_p, n_u, Protocol.CROSSFIT, opts, negative_control=False)
    seed = resolve_seed(random_state)
    rep = crossfit_replicates(np.vstack([xp, xu]), n_p, opts.n_folds, opts.n_permutations, seed)
    stats = welch_t_rows(rep.scores, rep.is_p)
    observed = float(stats[0])
    p = permutation_p_value(observed, stats[1:])
    s0 = rep.scores[0]
    sp, su = s0[:n_p], s0[n_p:]
    rows = [ScoredImage("P", i, "test", int(rep.folds[0, i]), float(s0[i])) for i in range(n_p)]
    rows += [ScoredImage("U", i, "test", int(rep.folds[0, n_p + i]), float(s0[n_p + i])) for i in range(n_u)]
    return ProtocolResult.of_scores(
        sp, su,
        protocol=Protocol.CROSSFIT,
        statistic_name="welch_t",
        statistic=observed,
        df=None,
        p_value=p,
        n_p=n_p,
        n_u=n_u,
        n_fit_p=n_p,
        n_fit_u=n_u,
        alpha=alpha,
        fit_fraction=None,
        n_folds=opts.n_folds,
        n_permutations=opts.n_permutations,
        random_state=seed,
        rows=tuple(rows),
    )


# --- the directional protocol -------------------------------------------------------------


@dataclass(frozen=True)
class SequentialPValue:
    """A sequential Monte Carlo permutation p-value (Besag & Clifford 1991).

    ``p_value``: h / L if the ``exceedances``-th permuted statistic at or above the observed
    one came at draw L, else (1 + c) / (1 + N) after all N = ``max_permutations`` draws with
    c such statistics. ``n_drawn``: the permutations drawn (L or N); ``n_exceeding``: how many
    of them reached the observed statistic.
    """

    p_value: float
    n_drawn: int
    n_exceeding: int


def sequential_permutation_p_value(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    n_p: int,
    *,
    exceedances: int,
    max_permutations: int,
    random_state: int,
) -> tuple[float, SequentialPValue]:
    """Observed statistic and sequential permutation p-value of a two-sample statistic.

    ``statistic`` maps a boolean label matrix ``[R, n]`` (True: the image plays P; row by row
    exactly ``n_p`` True) to ``[R]`` statistics, larger meaning "P more member-like". The
    observed labelling puts the first ``n_p`` images in P. Permuted labellings are uniform
    random subsets of size ``n_p``, drawn in blocks of growing size from ``random_state``,
    so the result depends only on the arguments. Under exchangeability P(p ≤ u) ≤ u for
    every u: the p-value is exact in the same sense as a fixed-count permutation test, and
    it stops early when the evidence is weak, which keeps null-like audits cheap.
    """
    observed_labels = (np.arange(n) < n_p)[None, :]
    observed = float(statistic(observed_labels)[0])
    # A permuted statistic within a relative 100·eps of the observed one is a tie (≥), as
    # in permutation_p_value; NaN counts as ≥ (conservative).
    gamma = abs(observed) * 100.0 * np.finfo(np.float64).eps
    rng = np.random.default_rng(random_state)
    drawn = exceeding = 0
    block = 256
    # Blocks hold at most ~4 million labels, whatever the set sizes.
    largest = max(256, 4_000_000 // max(n, 1))
    while drawn < max_permutations:
        b = min(block, max_permutations - drawn)
        labels = rng.permuted(np.broadcast_to(np.arange(n), (b, n)), axis=1) < n_p
        z = statistic(labels)
        hits = (z >= observed - gamma) | np.isnan(z)
        total = exceeding + int(hits.sum())
        if total >= exceedances:
            # Stop at the draw that brought the h-th exceedance.
            last = int(np.flatnonzero(hits)[exceedances - exceeding - 1])
            n_drawn = drawn + last + 1
            return observed, SequentialPValue(exceedances / n_drawn, n_drawn, exceedances)
        exceeding = total
        drawn += b
        block = min(4 * block, largest)
    return observed, SequentialPValue((1 + exceeding) / (1 + drawn), drawn, exceeding)


def welch_t_columns(x: np.ndarray, is_p: np.ndarray) -> np.ndarray:
    """Welch's t (P minus U) of every column of ``x`` ``[n, k]`` for every row of ``is_p`` ``[R, n]``.

    Returns ``[R, k]``. Sums come from two matrix products, so thousands of labellings cost
    about as much as a few; a column whose both groups have no spread gives 0 (equal means)
    or ±inf, as :func:`welch_t_rows`.
    """
    g = np.asarray(is_p, dtype=np.float64)
    n_a = g.sum(axis=1, keepdims=True)
    n_b = x.shape[0] - n_a
    # Centre first: sums of squares of centred columns keep the variances accurate.
    xc = x - x.mean(axis=0)
    sum_a = g @ xc
    sq_a = g @ (xc * xc)
    sum_b = xc.sum(axis=0) - sum_a
    sq_b = (xc * xc).sum(axis=0) - sq_a
    mean_a, mean_b = sum_a / n_a, sum_b / n_b
    var_a = np.maximum(sq_a - n_a * mean_a**2, 0.0) / (n_a - 1)
    var_b = np.maximum(sq_b - n_b * mean_b**2, 0.0) / (n_b - 1)
    diff = mean_a - mean_b
    se = np.sqrt(var_a / n_a + var_b / n_b)
    tiny = 1e-12 * np.sqrt((xc * xc).mean(axis=0))  # spread below rounding noise: none
    degenerate = np.where(diff > tiny, np.inf, np.where(diff < -tiny, -np.inf, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > tiny, diff / np.where(se > 0, se, 1.0), degenerate)


def candidate_matrix(
    x: np.ndarray, candidates: tuple[tuple[int, ...], ...] | None, combined: bool = False
) -> np.ndarray:
    """Each image's value ``[n, m]`` of each candidate statistic; larger means more member-like.

    ``x`` ``[n, k]``: the pooled images' features. Every column is first put on one scale,
    using the pooled images alone (no labels, so permutations see the same transform): the
    logarithm where the column is strictly positive (the loss-type features are norms, whose
    spread grows with their size; their logarithm is far closer to normal), then centred and
    divided by its standard deviation. A candidate is the mean of its group of columns,
    negated. A column without any spread contributes zeros. With ``combined`` and at least
    two candidates, one more column: the mean of the candidates (m = groups + 1).
    """
    xs = np.asarray(x, dtype=np.float64)
    positive = np.all(xs > 0, axis=0)
    xs = np.where(positive, np.log(np.where(positive, xs, 1.0)), xs)
    sd = xs.std(axis=0)
    z = np.where(sd > 0, (xs - xs.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    groups = candidates if candidates is not None else tuple((j,) for j in range(xs.shape[1]))
    if any(max(g) >= xs.shape[1] for g in groups):
        raise InputError(f"a candidate names a feature column beyond the {xs.shape[1]} given")
    values = -np.column_stack([z[:, list(g)].mean(axis=1) for g in groups])
    if combined and len(groups) >= 2:
        values = np.column_stack([values, values.mean(axis=1)])
    return values


def directional_test(
    features_p: np.ndarray,
    features_u: np.ndarray,
    options: ProtocolOptions | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    random_state: int | None = None,
) -> ProtocolResult:
    """The directional protocol: max-T over loss-type candidates, sequential permutation p-value.

    ``features_p`` ``[n_p, k]``, ``features_u`` ``[n_u, k]``. The method fixes the direction
    of every loss-type feature: a training image's loss is lower. ``options.candidates``
    groups the columns into candidate statistics (:func:`candidate_matrix`: log, standardise,
    average, negate; with ``options.combined`` their mean is one more candidate, which gathers
    a signal spread over several of them). For each candidate, Welch's t of P minus U; the statistic is the
    largest of them, so the candidate that separates the sets best is found without fitting
    anything and without setting images aside. Its p-value comes from label permutations that
    recompute every candidate's t and take the largest again
    (:func:`sequential_permutation_p_value`), so the choice is paid for and the p-value is
    exact under exchangeability.

    Each image's score is its standardised value of the selected candidate, so that Welch's
    t of the scores (P minus U) is the statistic; ``selected_column`` is the candidate's index.
    Raises :class:`InputError` for too small sets, non-finite features, an α the stopping rule
    cannot reach, or no candidate with a spread.
    """
    alpha = check_alpha(alpha)
    opts = options or ProtocolOptions()
    if opts.exceedances / alpha >= opts.max_permutations + 1:
        raise InputError(
            f"the directional p-value stops after {opts.exceedances} exceedances or "
            f"{opts.max_permutations} permutations, which cannot show p < α = {alpha}: use at least "
            f"{math.ceil(opts.exceedances / alpha)} permutations"
        )
    xp, xu = _features(features_p, features_u)
    n_p, n_u = len(xp), len(xu)
    check_sizes(n_p, n_u, Protocol.DIRECTIONAL, opts, negative_control=False)
    seed = resolve_seed(random_state)
    x = candidate_matrix(np.vstack([xp, xu]), opts.candidates_for(xp.shape[1]), opts.combined)
    if not np.any(x.std(axis=0) > 0):
        raise InputError("no candidate feature varies between images: there is nothing to test")

    def statistic(is_p: np.ndarray) -> np.ndarray:
        return np.asarray(welch_t_columns(x, is_p).max(axis=1))

    _, seq = sequential_permutation_p_value(
        statistic, n_p + n_u, n_p, exceedances=opts.exceedances, max_permutations=opts.max_permutations,
        random_state=seed,
    )
    observed_t = welch_t_columns(x, (np.arange(n_p + n_u) < n_p)[None, :])[0]
    best = int(np.argmax(observed_t))
    column = x[:, best]
    spread = column.std()
    scores = (column - column.mean()) / spread if spread > 0 else np.zeros_like(column)
    sp, su = scores[:n_p], scores[n_p:]
    # The statistic as recompute() rebuilds it from the scores (bit-identical).
    t = float(welch_t_rows(scores[None, :], (np.arange(n_p + n_u) < n_p)[None, :])[0])
    rows = [ScoredImage("P", i, "test", None, float(sp[i])) for i in range(n_p)]
    rows += [ScoredImage("U", i, "test", None, float(su[i])) for i in range(n_u)]
    return ProtocolResult.of_scores(
        sp, su,
        protocol=Protocol.DIRECTIONAL,
        statistic_name="max_welch_t",
        statistic=t,
        df=None,
        p_value=seq.p_value,
        n_p=n_p,
        n_u=n_u,
        n_fit_p=0,
        n_fit_u=0,
        alpha=alpha,
        fit_fraction=None,
        n_folds=None,
        n_permutations=seq.n_drawn,
        random_state=seed,
        rows=tuple(rows),
        selected_column=best,
        exceedances=seq.n_exceeding,
        max_permutations=opts.max_permutations,
    )


def run_test(
    features_p: np.ndarray,
    features_u: np.ndarray,
    protocol: Protocol | str = DEFAULT_PROTOCOL,
    options: ProtocolOptions | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    random_state: int | None = None,
) -> ProtocolResult:
    """Run ``protocol`` (:func:`directional_test`, :func:`reference_test` or :func:`crossfit_test`).

    The default is :data:`DEFAULT_PROTOCOL`, the one every audit uses unless told otherwise.
    """
    proto = protocol_of(protocol)
    run = {
        Protocol.DIRECTIONAL: directional_test,
        Protocol.REFERENCE: reference_test,
        Protocol.CROSSFIT: crossfit_test,
    }[proto]
    return run(features_p, features_u, options, alpha=alpha, random_state=random_state)


def recompute(rows: Sequence[ScoredImage], protocol: Protocol | str) -> RecomputedTest:
    """Rebuild a test's statistic from its per-image rows alone.

    Reference protocol: Welch's t, df and one-sided p-value of the ``"test"`` rows' scores,
    P against U — equal to the original result. Cross-fitted protocol: the observed
    statistic (``df`` and ``p_value`` are ``None``: the permutation p-value needs the
    features).
    """
    proto = protocol_of(protocol)
    tested = [r for r in rows if r.role == "test"]
    if any(r.score is None for r in tested):
        raise InputError("a test row has no score")
    sp = np.array([r.score for r in tested if r.set_name == "P"], dtype=np.float64)
    su = np.array([r.score for r in tested if r.set_name == "U"], dtype=np.float64)
    if proto is Protocol.REFERENCE:
        t, df, p = welch_greater(sp, su)
        return RecomputedTest(statistic=t, df=df, p_value=p)
    _sample(sp, "P"), _sample(su, "U")
    # The same computation, in the same order (P first), as crossfit_test: bit-identical.
    pooled = np.r_[sp, su][None, :]
    is_p = (np.arange(pooled.shape[1]) < sp.size)[None, :]
    return RecomputedTest(statistic=float(welch_t_rows(pooled, is_p)[0]), df=None, p_value=None)
