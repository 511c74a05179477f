"""The p-value as a function of the number of images (the report's subsampling curve).

For a grid of sizes, many random subsamples of P and U (without replacement, U in the same
proportion as P) are audited again from the report's features with the report's protocol,
and the median p-value and a band (10th–90th percentile) are shown against α. The curve
says how stable the verdict is and how many images an owner would need: it is an
illustration derived from the report, not part of the evidence, and is fully determined by
the report and the curve's own seed.

The cross-fitted protocol's permutation test is rerun with fewer permutations than the audit
(:func:`curve_permutations`) to keep the curve cheap; its p-values are then slightly coarser,
never smaller than 1 / (1 + permutations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cdi.report.model import Report

__all__ = ["SubsamplingCurve", "curve_permutations", "subsampling_curve"]

#: Seed offset of the curve from the audit's seed (the audit uses seed … seed + 2).
CURVE_SEED_OFFSET = 3


@dataclass(frozen=True)
class SubsamplingCurve:
    """p-values of ``draws`` random subsamples at each size.

    ``sizes_p`` / ``sizes_u`` ``[S]``: images of P and U in the subsamples; ``p_values``
    ``[S, draws]``. ``n_permutations``: permutations per cross-fitted test (``None`` for
    the reference protocol).
    """

    protocol: str
    alpha: float
    sizes_p: tuple[int, ...]
    sizes_u: tuple[int, ...]
    draws: int
    n_permutations: int | None
    random_state: int
    p_values: np.ndarray

    @property
    def median(self) -> np.ndarray:
        return np.asarray(np.median(self.p_values, axis=1))

    @property
    def low(self) -> np.ndarray:
        return np.asarray(np.quantile(self.p_values, 0.1, axis=1))

    @property
    def high(self) -> np.ndarray:
        return np.asarray(np.quantile(self.p_values, 0.9, axis=1))

    @property
    def fraction_significant(self) -> np.ndarray:
        return np.asarray((self.p_values < self.alpha).mean(axis=1))


def curve_permutations(alpha: float, audit_permutations: int) -> int:
    """Permutations per cross-fitted test of the curve: 199, or enough for p to fall below α."""
    return min(audit_permutations, max(199, math.ceil(2.0 / alpha) - 1))


def _sizes(n_p: int, minimum: int, n_sizes: int) -> list[int]:
    if n_p <= minimum or n_sizes <= 1:
        return [n_p]
    grid = np.geomspace(minimum, n_p, n_sizes)
    return sorted({round(float(v)) for v in grid} | {n_p})


def subsampling_curve(
    report: Report,
    *,
    n_sizes: int = 5,
    draws: int | None = None,
    random_state: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SubsamplingCurve:
    """Rerun the report's protocol on random subsamples of its images (see the module docstring).

    ``draws`` defaults to 40 for the reference protocol and 8 for the cross-fitted one (each
    draw reruns the permutation test); ``random_state`` to the audit's seed + 3.
    ``progress(done, total)`` is called after each run.
    """
    from cdi.options import minimum_set_size
    from cdi.stats import run_test

    test = report.test
    opts = report.manifest.options
    crossfit = test.protocol == "crossfit"
    if crossfit:
        n_perm: int | None = curve_permutations(test.alpha, opts.n_permutations)
        options = opts.protocol_options(report.feature_layout.used, n_permutations=n_perm)
    elif test.protocol == "directional":
        # The curve shows p-values around α: resolving each below 1/(2·h/α) would cost seconds a draw.
        n_perm = min(opts.max_permutations, math.ceil(2 * opts.exceedances / test.alpha))
        options = opts.protocol_options(report.feature_layout.used, max_permutations=n_perm)
    else:
        n_perm, options = None, opts.protocol_options(report.feature_layout.used)
    draws = draws if draws is not None else (8 if crossfit else 40)
    if draws < 1:
        raise ValueError("draws must be at least 1")
    seed = random_state if random_state is not None else report.manifest.seeds.audit + CURVE_SEED_OFFSET
    xp, xu = report.used_features()
    n_p, n_u = len(xp), len(xu)
    minimum = minimum_set_size(test.protocol, options)
    # U in P's proportion, both at least the protocol's minimum.
    smallest_p = max(minimum, math.ceil(minimum * n_p / n_u)) if n_u < n_p else minimum
    sizes_p = _sizes(n_p, min(smallest_p, n_p), n_sizes)
    sizes_u = [min(n_u, max(minimum, round(k * n_u / n_p))) for k in sizes_p]

    rng = np.random.default_rng(seed)
    p_values = np.empty((len(sizes_p), draws))
    total, done = len(sizes_p) * draws, 0
    for i, (k_p, k_u) in enumerate(zip(sizes_p, sizes_u, strict=True)):
        for j in range(draws):
            sub_p = np.sort(rng.choice(n_p, k_p, replace=False))
            sub_u = np.sort(rng.choice(n_u, k_u, replace=False))
            run_seed = int(rng.integers(2**32))
            result = run_test(xp[sub_p], xu[sub_u], test.protocol, options, alpha=test.alpha,
                              random_state=run_seed)
            p_values[i, j] = result.p_value
            done += 1
            if progress is not None:
                progress(done, total)
    return SubsamplingCurve(
        protocol=test.protocol, alpha=test.alpha, sizes_p=tuple(sizes_p), sizes_u=tuple(sizes_u), draws=draws,
        n_permutations=n_perm, random_state=seed, p_values=p_values,
    )
