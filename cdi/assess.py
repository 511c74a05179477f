"""The audit's test, controls and verdict on features already extracted (method §6–§8).

:func:`assess` is everything :func:`cdi.audit.audit` does after the features and the image
descriptors are known: the test, its difficulty-calibrated twin, the negative control, the
direction check, the shift control, the distribution check, and the verdict. It is pure
(every draw comes from ``seed``), so the shift study (``bench/shift_study.py``) runs exactly
what an audit runs, on cached features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from cdi.calibration import (
    DEFAULT_ALPHA_SHIFT,
    DEFAULT_RIDGE,
    ShiftCheckResult,
    calibrated_statistics,
    design_matrix,
    shift_check,
)
from cdi.controls import (
    DistributionCheckResult,
    NegativeControlResult,
    direction_check,
    distribution_check,
    negative_control,
)
from cdi.errors import InputError
from cdi.options import Protocol, ProtocolOptions
from cdi.reads import DIRECTION_FEATURES
from cdi.stats import (
    ProtocolResult,
    ScoredImage,
    candidate_matrix,
    run_test,
    sequential_permutation_p_value,
)
from cdi.verdict import Verdict, decide

__all__ = ["DIRECTION_FEATURES", "Assessment", "assess", "calibrated_test", "direction_check", "member_likeness"]

@dataclass(frozen=True)
class Assessment:
    """The test, the controls and the verdict of one audit (or one sequential look)."""

    test: ProtocolResult
    #: The directional test on what the descriptors cannot explain (``None``: other protocols).
    calibrated: ProtocolResult | None
    negative_control: NegativeControlResult
    #: ``None`` where :func:`assess` was asked to run it only where it could matter.
    distribution: DistributionCheckResult | None
    shift: ShiftCheckResult
    reversal_p: float
    verdict: Verdict


def _member_likeness(x: np.ndarray, options: ProtocolOptions) -> np.ndarray:
    """Each pooled image's candidate statistics ``[n, m]`` (larger: more member-like)."""
    return candidate_matrix(x, options.candidates, options.combined)


def member_likeness(x: np.ndarray, options: ProtocolOptions) -> np.ndarray:
    """What the shift control predicts: each pooled image's candidate statistics ``[n, m]``.

    The directional candidates and their mean (:func:`cdi.stats.candidate_matrix`), larger
    meaning more like a training image.
    """
    return _member_likeness(x, options)


def calibrated_test(
    features_p: np.ndarray, features_u: np.ndarray, descriptors_p: np.ndarray, descriptors_u: np.ndarray,
    options: ProtocolOptions, *, alpha: float, random_state: int, ridge: float = DEFAULT_RIDGE,
    level: float | None = None,
) -> ProtocolResult:
    """The directional test on each candidate statistic less what U's descriptors predict of it.

    ``level``: the smallest level its p-value will be compared with (a sequential look's,
    below α; default α): it sets how far the p-value is resolved (:func:`calibrated_permutations`).

    The candidates (and their mean) are computed on the pooled images as the test computes
    them; a ridge fit on U's images learns how the descriptors predict each, and Welch's t
    compares P's and U's residuals; the statistic is the largest t. Its p-value comes from
    label permutations that refit on each permutation's own U
    (:func:`cdi.stats.sequential_permutation_p_value`), so it is exact under exchangeability.
    A fit on U alone never sees P's losses: a fit on both sets would absorb part of a real
    difference along whatever descriptor happens to differ between the sets.
    """
    if options.exceedances / alpha >= options.max_permutations + 1:
        raise InputError(f"the calibrated test stops after {options.exceedances} exceedances or "
                         f"{options.max_permutations} permutations, which cannot show p < α = {alpha}")
    # Each permutation refits the ridge on its own U (about 40 µs): resolving p below 1e-6
    # would cost a strong audit ~40 s of CPU for a number no verdict reads. Whether p < α
    # depends only on the first ⌈h / α⌉ draws (Besag & Clifford), so the calibrated test stops
    # there; its p-value floor, and so the verdict's, is then about α / h (1e-4 by default).
    max_permutations = min(options.max_permutations,
                           calibrated_permutations(options.exceedances, alpha if level is None else level))
    x = np.vstack([features_p, features_u])
    values = _member_likeness(x, options)
    z = design_matrix(np.vstack([descriptors_p, descriptors_u]))
    n_p, n = len(features_p), len(x)

    def statistic(is_p: np.ndarray) -> np.ndarray:
        return np.asarray(calibrated_statistics(values, z, is_p, ridge).max(axis=1))

    _, seq = sequential_permutation_p_value(statistic, n, n_p, exceedances=options.exceedances,
                                            max_permutations=max_permutations, random_state=random_state)
    observed = (np.arange(n) < n_p)[None, :]
    ts = calibrated_statistics(values, z, observed, ridge)[0]
    best = int(np.argmax(ts))
    residual = calibrate_on_u(values, z, n_p, ridge)
    column = residual[:, best]
    spread = column.std()
    scores = (column - column.mean()) / spread if spread > 0 else np.zeros_like(column)
    sp, su = scores[:n_p], scores[n_p:]
    rows = [ScoredImage("P", i, "test", None, float(sp[i])) for i in range(n_p)]
    rows += [ScoredImage("U", i, "test", None, float(su[i])) for i in range(n - n_p)]
    return ProtocolResult.of_scores(
        sp, su, protocol=Protocol.DIRECTIONAL, statistic_name="max_welch_t", statistic=float(ts[best]), df=None,
        p_value=seq.p_value, n_p=n_p, n_u=n - n_p, n_fit_p=0, n_fit_u=n - n_p, alpha=alpha, fit_fraction=None,
        n_folds=None, n_permutations=seq.n_drawn, random_state=random_state, rows=tuple(rows),
        selected_column=best, exceedances=seq.n_exceeding, max_permutations=max_permutations,
    )


def calibrated_permutations(exceedances: int, alpha: float) -> int:
    """The calibrated test's largest number of permutations: ⌈h / α⌉, the draws on which
    whether its p-value is below α depends."""
    return math.ceil(exceedances / alpha)


def calibrate_on_u(values: np.ndarray, z: np.ndarray, n_p: int, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """``values`` less their ridge prediction from ``z`` fitted on U's rows (the last ones)."""
    n, k = z.shape
    z1 = np.hstack([np.ones((n, 1)), z])
    penalty = np.eye(k + 1)
    penalty[0, 0] = 0.0
    u = z1[n_p:]
    beta = np.linalg.solve(u.T @ u + ridge * (n - n_p) * penalty, u.T @ values[n_p:])
    return np.asarray(values - z1 @ beta)


def assess(
    features_p: np.ndarray,
    features_u: np.ndarray,
    descriptors_p: np.ndarray,
    descriptors_u: np.ndarray,
    stats_p: np.ndarray,
    stats_u: np.ndarray,
    *,
    columns: Sequence[int],
    protocol: Protocol | str,
    options: ProtocolOptions,
    alpha: float,
    seed: int,
    control_options: ProtocolOptions | None = None,
    test: ProtocolResult | None = None,
    alpha_shift: float = DEFAULT_ALPHA_SHIFT,
    distribution: Literal["always", "when_used", "never"] = "always",
    calibrated_weight: float = 1.0,
    classes: Sequence[Any] | None = None,
) -> Assessment:
    """Test, controls and verdict of P against U.

    ``features_*``: rows of all 26 layout columns (NaN where not computed); ``columns``: the
    tested ones. ``descriptors_*``: :func:`cdi.calibration.image_descriptors` of each image;
    ``stats_*``: :func:`cdi.controls.image_statistics` of each file. ``test``: the test's
    result where it already ran (a sequential look), else it runs here with ``options``;
    the controls use ``control_options`` (default ``options``). Seeds: the test ``seed``,
    the negative control ``seed + 1``, the distribution check ``seed + 2``, the calibrated
    test ``seed + 3``. ``distribution="when_used"`` runs the distribution check (the costliest
    step) only where the verdict would otherwise be ``used``, the one outcome it can change:
    the verdict is the same, and ``Assessment.distribution`` is ``None`` where it did not run.
    ``"never"`` (studies of power only) gives the verdict before the check: a ``used`` it
    might still turn ``inconclusive``.
    ``calibrated_weight``: a sequential look's share of α (its level / α); the calibrated
    p-value is divided by it, as the looks' p-values are (weighted Bonferroni), so that the
    calibrated test, too, keeps its level whichever look stops the audit. ``classes``: each
    image's class (P first) for a class-conditional model: the shift control also asks
    whether P and U hold the same classes (seed ``seed + 4``).
    """
    protocol = Protocol(protocol)
    cols = list(columns)
    xp, xu = np.asarray(features_p)[:, cols], np.asarray(features_u)[:, cols]
    dp, du = np.asarray(descriptors_p, dtype=np.float64), np.asarray(descriptors_u, dtype=np.float64)
    if len(dp) != len(xp) or len(du) != len(xu):
        raise InputError("one descriptor row per image is needed")
    if test is None:
        test = run_test(xp, xu, protocol, options, alpha=alpha, random_state=seed)
    copts = control_options or options
    control = negative_control(xu, protocol, copts, alpha=alpha, random_state=seed + 1)
    if distribution not in ("always", "when_used", "never"):
        raise InputError(f"distribution must be always, when_used or never, got {distribution!r}")
    dist = distribution_check(stats_p, stats_u, random_state=seed + 2) if distribution == "always" else None
    reversal = direction_check(features_p, features_u)
    likeness = _member_likeness(np.vstack([xp, xu]), copts)
    shift = shift_check(likeness, np.vstack([dp, du]), len(xp), alpha_shift=alpha_shift,
                        classes=None if classes is None else list(classes), random_state=seed + 4)
    calibrated = None
    if protocol is Protocol.DIRECTIONAL:
        if not 0.0 < calibrated_weight <= 1.0:
            raise InputError(f"calibrated_weight must lie in (0, 1], got {calibrated_weight}")
        # Resolved as far as the look's own level needs: its p-value is compared with α · weight.
        calibrated = calibrated_test(xp, xu, dp, du, copts, alpha=test.alpha, random_state=seed + 3,
                                     level=test.alpha * calibrated_weight)
        if calibrated_weight != 1.0:
            calibrated = replace(calibrated, p_value=min(1.0, calibrated.p_value / calibrated_weight))
    verdict = decide(test, control, dist, reversal_p=reversal, calibrated=calibrated, shift=shift)
    if dist is None and distribution == "when_used" and verdict.outcome.value == "used":
        dist = distribution_check(stats_p, stats_u, random_state=seed + 2)
        verdict = decide(test, control, dist, reversal_p=reversal, calibrated=calibrated, shift=shift)
    return Assessment(test, calibrated, control, dist, shift, reversal, verdict)
