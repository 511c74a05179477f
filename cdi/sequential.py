"""Sequential audits (method §10, "Sequential audits"): look at the evidence in rounds, stop early.

An audit's features cost network passes, so an audit that can stop once the evidence is
clear saves most of them on a model that plainly memorised P. The design:

- **Rounds.** P and U are each put in a random order (seeded); look k tests the first
  ``n_p[k]`` images of P and ``n_u[k]`` of U, about k/K of each set, so a look needs only the
  images extracted so far. Looks that would hold fewer than :data:`MIN_LOOK_SET` images of a
  set are merged into the next one.
- **The test at a look** is the directional protocol (:func:`cdi.stats.directional_test`) on
  the images so far, with its exact label-permutation p-value ``p_k``, conditional on those
  images: under H0 (the model saw neither set) they are exchangeable between P and U, so
  P(p_k ≤ u) ≤ u for every u, whichever images later rounds would add.
- **Boundaries.** An α-spending function α(t) (:class:`~cdi.options.Spending`) gives look k
  the nominal level a_k = α(t_k) − α(t_{k−1}), t_k the share of the images looked at; the
  a_k sum to α. A look *crosses* when p_k < a_k. By the union bound, P(any look crosses) ≤
  Σ a_k = α under H0: the false-positive rate stays ≤ α however the audit stops — at the
  first crossing, after a failed control, for futility — and without ever looking at
  images that were not extracted. The bound ignores the correlation between looks, which
  costs a little power at the last look (a_K < α); in exchange it is exact, not asymptotic.
- **The p-value** of a sequential audit is p = min_k p_k / w_k over the looks taken, with
  w_k = a_k / α the share of α look k holds (a weighted Bonferroni p-value): p < α exactly
  when some look crossed, and P(p ≤ u) ≤ u for every u under H0.

Every function is pure; the audit (:func:`cdi.audit.audit`) interleaves them with the
extraction, and :func:`sequential_test` runs them on features already at hand (studies,
``cdi recompute``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

from cdi.errors import InputError
from cdi.options import FUTILITY_P, MIN_LOOK_SET, ProtocolOptions, SequentialOptions, Spending, check_alpha
from cdi.stats import ProtocolResult, directional_test

__all__ = [
    "Look",
    "LookResult",
    "SequentialDesign",
    "SequentialResult",
    "control_options",
    "design",
    "look_options",
    "run_look",
    "sequential_p_value",
    "sequential_test",
    "spent",
]


def spent(rule: Spending | str, alpha: float, t: float) -> float:
    """α spent by information fraction ``t`` ∈ [0, 1] under ``rule`` (α(0) = 0, α(1) = α)."""
    if t <= 0.0:
        return 0.0
    if t >= 1.0:
        return alpha
    rule = Spending(rule)
    if rule is Spending.OBRIEN_FLEMING:
        z = sps.norm.isf(alpha / 2.0)
        return float(min(alpha, 2.0 * sps.norm.sf(z / math.sqrt(t))))
    return float(alpha * math.log1p((math.e - 1.0) * t))


@dataclass(frozen=True)
class Look:
    """One planned look: the first ``n_p`` images of P and ``n_u`` of U (in the audit's order).

    ``fraction``: the share of all images looked at (the information fraction t);
    ``spent``: α spent by this look, α(t); ``level``: this look's nominal level a_k.
    """

    n_p: int
    n_u: int
    fraction: float
    spent: float
    level: float


@dataclass(frozen=True)
class SequentialDesign:
    """The looks of a sequential audit, fixed by the set sizes and options before any feature."""

    alpha: float
    spending: Spending
    futility: bool
    planned_looks: int
    looks: tuple[Look, ...]

    def weight(self, k: int) -> float:
        """The share of α look ``k`` holds (Σ = 1)."""
        return self.looks[k].level / self.alpha


def design(n_p: int, n_u: int, options: SequentialOptions, alpha: float, *, floor: float = 0.0) -> SequentialDesign:
    """Plan the looks for sets of ``n_p`` and ``n_u`` images.

    Look k (1-based, of K = ``options.looks``) takes ⌈k·n/K⌉ images of each set. A look is
    dropped (its α carried over to the next look kept) if it holds fewer than
    :data:`MIN_LOOK_SET` images of either set, no more images than the look before, or if its
    level is below the smallest p-value its images allow at all (one labelling among the
    C(n_p + n_u, n_p): 5 + 5 images never give p < 1/252) or below ``floor`` (the smallest
    p-value the permutation count allows, 1 / (1 + N)). The plan depends on the set sizes
    and the options alone, never on the data. Raises :class:`InputError` if a set holds fewer
    than :data:`MIN_LOOK_SET` images.
    """
    alpha = check_alpha(alpha)
    if min(n_p, n_u) < MIN_LOOK_SET:
        raise InputError(f"a sequential audit needs at least {MIN_LOOK_SET} images per set, got P = {n_p}, U = {n_u}")
    total = n_p + n_u
    k_max = options.looks
    sizes: list[tuple[int, int]] = []
    for k in range(1, k_max + 1):
        size = (math.ceil(k * n_p / k_max), math.ceil(k * n_u / k_max))
        if min(size) < MIN_LOOK_SET or (sizes and size == sizes[-1]):
            continue
        sizes.append(size)
    looks = []
    before = 0.0
    for i, (a, b) in enumerate(sizes):
        fraction = (a + b) / total
        now = spent(options.spending, alpha, fraction)
        level = now - before
        if i < len(sizes) - 1 and (level * math.comb(a + b, a) <= 1.0 or level <= floor):
            continue  # no labelling of these images could cross: spend this look's α later
        looks.append(Look(a, b, fraction, now, level))
        before = now
    return SequentialDesign(alpha, options.spending, options.futility, k_max, tuple(looks))


def look_options(options: ProtocolOptions, level: float, alpha: float) -> ProtocolOptions:
    """The directional test's options at a look of nominal level ``level``.

    Looks test sets of at least :data:`MIN_LOOK_SET`; whether p < ``level`` depends only on the
    first ⌈h / level⌉ permutations (Besag–Clifford), so none are drawn beyond them (nor
    beyond ``options.max_permutations``). A level below the p-value's floor 1 / (1 + N) cannot
    be crossed: such a look draws ⌈h / α⌉ permutations, enough for its record and for futility.
    """
    n = options.max_permutations
    cap = math.ceil(options.exceedances / level) if level * (1 + n) > 1 else math.ceil(options.exceedances / alpha)
    return replace(options, min_set=MIN_LOOK_SET, max_permutations=min(n, cap))


def control_options(options: ProtocolOptions) -> ProtocolOptions:
    """The options of a sequential audit's negative control: halves of at least :data:`MIN_LOOK_SET`.

    The control runs on the U images of the look it checks, so its halves can be as small as
    a look's sets; its result is otherwise that of the fixed design's control.
    """
    return replace(options, min_set=MIN_LOOK_SET)


@dataclass(frozen=True)
class LookResult:
    """What one look found: its test on the images so far, and what it decided.

    ``crossed``: p < the look's level. ``controls_passed``: for a crossing look, whether the
    controls passed on the images so far (``None``: not run). ``futile``: futility stopping
    is on, this is not the last look, and p ≥ :data:`FUTILITY_P`.
    """

    look: Look
    test: ProtocolResult
    crossed: bool
    controls_passed: bool | None
    futile: bool


def run_look(
    design_: SequentialDesign, k: int, features_p: np.ndarray, features_u: np.ndarray,
    options: ProtocolOptions, *, random_state: int,
) -> ProtocolResult:
    """The directional test of look ``k`` on the first images of each set (``[n_p, f]``, ``[n_u, f]``).

    The arrays hold at least the look's images; only the look's first rows are used.
    """
    look = design_.looks[k]
    if len(features_p) < look.n_p or len(features_u) < look.n_u:
        raise InputError(f"look {k + 1} needs {look.n_p} + {look.n_u} images, got {len(features_p)} + "
                         f"{len(features_u)}")
    return directional_test(features_p[: look.n_p], features_u[: look.n_u],
                            look_options(options, look.level, design_.alpha), alpha=design_.alpha,
                            random_state=random_state)


def sequential_p_value(design_: SequentialDesign, p_values: list[float]) -> float:
    """The sequential audit's p-value from the looks taken: min_k p_k / w_k, at most 1."""
    return float(min(1.0, min(p / design_.weight(k) for k, p in enumerate(p_values))))


@dataclass(frozen=True)
class SequentialResult:
    """A sequential audit's test: every look taken, why it stopped, and the p-value.

    ``stop``: ``"boundary"`` (a look crossed and its controls passed), ``"futility"``, or
    ``"final"`` (the last look was reached). ``test`` is the stopping look's test with
    ``p_value`` replaced by the sequential p-value, so that the verdict reads it as any test.
    """

    design: SequentialDesign
    looks: tuple[LookResult, ...]
    stop: str
    p_value: float
    test: ProtocolResult

    @property
    def n_p(self) -> int:
        return self.looks[-1].look.n_p

    @property
    def n_u(self) -> int:
        return self.looks[-1].look.n_u


def sequential_test(
    features_p: np.ndarray,
    features_u: np.ndarray,
    design_: SequentialDesign,
    options: ProtocolOptions,
    *,
    random_state: int,
    controls: Callable[[int, ProtocolResult], bool] | None = None,
    features_for: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> SequentialResult:
    """Run the looks of ``design_`` until one stops the audit.

    ``features_p`` ``[n_p, f]`` and ``features_u`` ``[n_u, f]`` hold the sets in the audit's
    order; ``features_for(k)``, if given, is called before look k instead and returns arrays
    holding at least that look's images (the audit extracts them then). ``controls(k, test)``
    says whether the controls pass on look k's images (``test``: the look's test); it is
    called only for a crossing look
    (``None``: the controls are taken to pass). Every look runs with ``random_state``.
    """
    taken: list[LookResult] = []
    stop = "final"
    last = len(design_.looks) - 1
    for k, look in enumerate(design_.looks):
        xp, xu = features_for(k) if features_for is not None else (features_p, features_u)
        test = run_look(design_, k, xp, xu, options, random_state=random_state)
        crossed = bool(test.p_value < look.level and test.statistic > 0)
        passed = None
        if crossed:
            passed = True if controls is None else bool(controls(k, test))
        futile = design_.futility and k < last and not crossed and test.p_value >= FUTILITY_P
        taken.append(LookResult(look, test, crossed, passed, futile))
        if crossed and passed:
            stop = "boundary"
            break
        if futile:
            stop = "futility"
            break
    p = sequential_p_value(design_, [r.test.p_value for r in taken])
    return SequentialResult(design_, tuple(taken), stop, p, replace(taken[-1].test, p_value=p))
