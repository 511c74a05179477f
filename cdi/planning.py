"""How many images an audit needs: power of the directional test from a pilot.

A pilot is a few images of each set with their features: a small audit, or an earlier
report. The pilot's features become the directional test's candidate statistics
(:func:`cdi.stats.candidate_matrix`), and for every candidate j the planner estimates the
standardised difference δ_j = (mean_P − mean_U) / sd (member-likeness; sd pooled within the
sets) and the candidates' correlation matrix R (within the sets, so that a real difference
between P and U does not masquerade as correlation). The directional statistic is the
largest of the candidates' t statistics; with n_p and n_u images its t-vector is approximately
N(δ / √(1/n_p + 1/n_u), R), and under H0 N(0, R). So

    power(n_p, n_u) ≈ P( max_j (Z_j + δ_j / √(1/n_p + 1/n_u)) ≥ c_α ),   Z ~ N(0, R),

with c_α the (1 − α) quantile of max_j Z_j, both by Monte Carlo on one seeded set of draws.
The smallest n with power ≥ the target is found by bisection (U kept in the pilot's or the
given proportion). Its uncertainty comes from the pilot's own sampling error: the pilot's
images are resampled with replacement (bootstrap), δ and R re-estimated, and the required
n recomputed; the report gives the median and a percentile interval. A small pilot's δ is
noisy, and the largest of several noisy δ is biased upwards, so the interval matters more
than the point.

Pure numpy; no torch, no scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cdi.errors import InputError
from cdi.options import DEFAULT_ALPHA, Protocol, ProtocolOptions, check_alpha, minimum_sizes

__all__ = ["DEFAULT_POWER", "MAX_PLANNED_SET", "Plan", "plan_audit", "power_at"]

#: The power an audit is planned for.
DEFAULT_POWER = 0.9
#: Sets larger than this are reported as "more than": the planner does not extrapolate further.
MAX_PLANNED_SET = 100_000
_DRAWS = 20_000


@dataclass(frozen=True)
class Plan:
    """The planner's answer.

    ``n_per_set``: images of P needed for ``power`` at ``alpha`` (U holds ``u_ratio`` times as
    many), or ``None`` when no size up to :data:`MAX_PLANNED_SET` reaches it (no usable
    signal in the pilot). ``interval``: the ``confidence`` percentile interval of that number
    over ``bootstraps`` resamples of the pilot (``None`` bounds: not reached). ``power_now``:
    the estimated power at the pilot's own sizes. ``effects``: the estimated δ of the
    strongest candidates, largest first.
    """

    n_per_set: int | None
    interval: tuple[int | None, int | None]
    confidence: float
    power: float
    alpha: float
    u_ratio: float
    n_pilot_p: int
    n_pilot_u: int
    power_now: float
    effects: tuple[tuple[str, float], ...]
    bootstraps: int

    @property
    def additional_p(self) -> int | None:
        """Images of P beyond the pilot's that the plan asks for (0 if the pilot suffices)."""
        return None if self.n_per_set is None else max(0, self.n_per_set - self.n_pilot_p)

    def summary(self) -> str:
        """One paragraph for a person: the number, its uncertainty and what it rests on."""
        def fmt(v: int | None) -> str:
            return f"more than {MAX_PLANNED_SET:,}" if v is None else f"{v:,}"

        lo, hi = self.interval
        if self.n_per_set is None:
            head = (f"The pilot shows no usable difference between P and U: no audit of up to "
                    f"{MAX_PLANNED_SET:,} images per set would reach {self.power:.0%} power at α = {self.alpha}.")
        else:
            head = (f"About {self.n_per_set:,} published images (and {math.ceil(self.n_per_set * self.u_ratio):,} "
                    f"unpublished) give the directional test {self.power:.0%} power at α = {self.alpha} "
                    f"({self.confidence:.0%} interval from the pilot's sampling error: {fmt(lo)} to {fmt(hi)}).")
        lead = ", ".join(f"{name} {d:+.2f}" for name, d in self.effects[:3])
        return (f"{head} Estimated from {self.n_pilot_p} + {self.n_pilot_u} pilot images; power at the pilot's own "
                f"size {self.power_now:.0%}; strongest standardised differences (P more member-like): {lead}.")


def _effects(xp: np.ndarray, xu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """δ ``[m]`` (P minus U, pooled within-set sd) and the within-set correlation ``[m, m]``."""
    cp, cu = xp - xp.mean(axis=0), xu - xu.mean(axis=0)
    within = np.vstack([cp, cu])
    dof = max(len(within) - 2, 1)
    sd = np.sqrt((within**2).sum(axis=0) / dof)
    safe = np.where(sd > 0, sd, 1.0)
    delta = np.where(sd > 0, (xp.mean(axis=0) - xu.mean(axis=0)) / safe, 0.0)
    z = within / safe
    corr = (z.T @ z) / dof
    d = np.sqrt(np.clip(np.diag(corr), 1e-12, None))
    corr = corr / d[:, None] / d[None, :]
    # A tiny ridge keeps the Cholesky factor defined when features are (nearly) collinear.
    corr = 0.999 * corr + 0.001 * np.eye(len(corr))
    return delta, corr


class _Power:
    """power(n_p, n_u) for one (δ, R), on fixed standard normal draws.

    The t statistics are drawn as multivariate t: (Z + shift) / √(χ²_ν / ν) with ν = n_p + n_u − 2
    (χ² by the Wilson–Hilferty cube), which matters at the small sizes audits run at: the
    largest of several t statistics has a heavier tail than the largest of normals.
    """

    def __init__(self, delta: np.ndarray, corr: np.ndarray, alpha: float, base: np.ndarray) -> None:
        self.delta = delta
        self.alpha = alpha
        self.z = base[:, : len(delta)] @ np.linalg.cholesky(corr).T
        self.w = base[:, -1]

    def __call__(self, n_p: float, n_u: float) -> float:
        nu = max(n_p + n_u - 2.0, 1.0)
        h = 2.0 / (9.0 * nu)
        scale = 1.0 / np.sqrt(np.clip(1.0 - h + self.w * math.sqrt(h), 1e-3, None) ** 3)[:, None]
        critical = float(np.quantile((self.z * scale).max(axis=1), 1.0 - self.alpha))
        shift = self.delta / math.sqrt(1.0 / n_p + 1.0 / n_u)
        return float((((self.z + shift) * scale).max(axis=1) >= critical).mean())

    def smallest(self, target: float, ratio: float) -> int | None:
        # No fewer published images than an audit accepts, nor so few that U (ratio times as
        # many) would be refused: the negative control splits U in two.
        sizes = minimum_sizes(Protocol.DIRECTIONAL)
        lo = hi = max(sizes.p, math.ceil(sizes.u / ratio))
        while self(hi, hi * ratio) < target:
            if hi >= MAX_PLANNED_SET:
                return None
            lo, hi = hi, min(2 * hi, MAX_PLANNED_SET)
        if self(lo, lo * ratio) >= target:
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self(mid, mid * ratio) >= target else (mid, hi)
        return hi


def power_at(
    features_p: np.ndarray, features_u: np.ndarray, columns: tuple[int, ...] | list[int], n_p: int, n_u: int, *,
    alpha: float = DEFAULT_ALPHA, random_state: int = 0,
) -> float:
    """Estimated power of the directional test with ``n_p`` + ``n_u`` images, from pilot features.

    ``features_*``: ``[n, k]``, the layout columns ``columns`` (as the audit's test sees them).
    """
    xp, xu, _ = _pilot(features_p, features_u, columns)
    delta, corr = _effects(xp, xu)
    base = np.random.default_rng(random_state).standard_normal((_DRAWS, xp.shape[1] + 1))
    return _Power(delta, corr, check_alpha(alpha), base)(n_p, n_u)


def _pilot(
    features_p: np.ndarray, features_u: np.ndarray, columns: tuple[int, ...] | list[int]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The pilot's candidate statistics, P ``[n_p, m]`` and U ``[n_u, m]``, and their names."""
    from cdi.features.layout import member_candidates
    from cdi.stats import candidate_matrix

    xp = np.asarray(features_p, dtype=np.float64)
    xu = np.asarray(features_u, dtype=np.float64)
    if xp.ndim != 2 or xu.ndim != 2 or xp.shape[1] != xu.shape[1] or xp.shape[1] != len(columns):
        raise InputError(f"pilot features must be two 2-D arrays [images, {len(columns)} features]")
    if len(xp) < 3 or len(xu) < 3:
        raise InputError(f"a pilot needs at least 3 images of each set, got {len(xp)} and {len(xu)}")
    if not (np.all(np.isfinite(xp)) and np.all(np.isfinite(xu))):
        raise InputError("the pilot's features hold non-finite values")
    names, groups = member_candidates(list(columns))
    # The candidates the audit's test looks at, the combined one included where it does.
    x = candidate_matrix(np.vstack([xp, xu]), groups, combined=ProtocolOptions().combined)
    return x[: len(xp)], x[len(xp):], names


def plan_audit(
    features_p: np.ndarray,
    features_u: np.ndarray,
    columns: tuple[int, ...] | list[int],
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = DEFAULT_POWER,
    u_ratio: float | None = None,
    bootstraps: int = 200,
    confidence: float = 0.8,
    random_state: int = 0,
) -> Plan:
    """Plan an audit from pilot features of the tested columns (see the module docstring).

    ``features_p`` ``[n_p, k]``, ``features_u`` ``[n_u, k]``: the pilot's features, the layout
    columns ``columns`` (those the audit's test sees: ``AuditOptions.tested_columns``).
    ``u_ratio``: U's size relative to P's in the planned audit (default: the pilot's). Raises
    :class:`InputError` for a pilot of fewer than 3 images per set or options out of range.
    """
    alpha = check_alpha(alpha)
    if not 0.0 < power < 1.0:
        raise InputError(f"power must lie strictly between 0 and 1, got {power}")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if bootstraps < 1:
        raise InputError(f"bootstraps must be at least 1, got {bootstraps}")
    xp, xu, names = _pilot(features_p, features_u, columns)
    ratio = len(xu) / len(xp) if u_ratio is None else float(u_ratio)
    if not 0.0 < ratio <= 1_000:
        raise InputError(f"u_ratio must lie in (0, 1000], got {u_ratio}")
    rng = np.random.default_rng(random_state)
    base = rng.standard_normal((_DRAWS, xp.shape[1] + 1))
    delta, corr = _effects(xp, xu)
    point = _Power(delta, corr, alpha, base)
    needed = point.smallest(power, ratio)
    boot: list[float] = []
    small = rng.standard_normal((_DRAWS // 4, xp.shape[1] + 1))
    for _ in range(bootstraps):
        bp = xp[rng.integers(0, len(xp), len(xp))]
        bu = xu[rng.integers(0, len(xu), len(xu))]
        n = _Power(*_effects(bp, bu), alpha, small).smallest(power, ratio)
        boot.append(math.inf if n is None else n)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.array(boot), [tail, 1.0 - tail], method="inverted_cdf")
    order = np.argsort(-delta, kind="stable")
    return Plan(
        n_per_set=needed,
        interval=(None if math.isinf(lo) else int(lo), None if math.isinf(hi) else int(hi)),
        confidence=confidence, power=power, alpha=alpha, u_ratio=ratio, n_pilot_p=len(xp), n_pilot_u=len(xu),
        power_now=point(len(xp), len(xu)),
        effects=tuple((str(names[j]), float(delta[j])) for j in order[:5]),
        bootstraps=bootstraps,
    )
