"""Which candidate statistics should the directional test take the largest of?

For each shipped model (features cached by ``bench/statistics_study.py``), and each set size,
this compares candidate sets by their power at α = 0.01 against the best single loss-type
candidate chosen in hindsight:

- ``max_S``: the largest Welch t among the candidates of set S;
- ``mean_S``: Welch's t of the mean of S's candidates (one fixed combination, no choice);
- ``maxmean_S``: the largest of both (S's candidates and their mean: what the default does).

Every statistic's critical value is the 99th percentile of its value over ``--null`` null
audits (P and U both drawn from the held-out images), so each is compared at the same
false-positive rate, as the permutation test would; power is the share of ``--positive``
positive audits (P from the members) above it. This is a design study, cheaper than running
every permutation test: ``bench/statistics_study.py`` measures the chosen procedure itself.
It prints, per procedure, the worst and the mean gap to the best single candidate over all
models and sizes.

    python bench/candidate_sets.py [--models ...] [--null 4000] [--positive 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cdi.features.layout import FEATURE_NAMES, GM_ML_TIMESTEPS
from cdi.stats import candidate_matrix

#: Every loss-type attack as one candidate: the directional test's candidates are chosen among these.
ALL_CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dl", ("dl",)),
    ("secmi_stat", ("secmi_stat",)),
    ("pia", ("pia",)),
    ("pian", ("pian",)),
    ("ml_low_t", tuple(f"ml_t{t:03d}" for t in GM_ML_TIMESTEPS if t < 400)),
    ("ml_high_t", tuple(f"ml_t{t:03d}" for t in GM_ML_TIMESTEPS if t >= 400)),
    ("gm_low_t", tuple(f"gm_t{t:03d}" for t in GM_ML_TIMESTEPS if t < 400)),
    ("gm_high_t", tuple(f"gm_t{t:03d}" for t in GM_ML_TIMESTEPS if t >= 400)),
    ("no_loss", ("no_loss",)),
)
NAMES = tuple(name for name, _ in ALL_CANDIDATES)
SETS: dict[str, tuple[str, ...]] = {
    "nine": NAMES,
    "five": ("dl", "secmi_stat", "pia", "pian", "ml_low_t"),
    "four": ("dl", "pia", "pian", "ml_low_t"),
    "three": ("dl", "pia", "ml_low_t"),
}
SIZES = (10, 20, 30, 50, 100, 200, 300)


def welch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))


def statistics(x: np.ndarray, n_p: int) -> dict[str, float]:
    """Every procedure's statistic, and every single candidate's t, for P = x[:n_p], U = the rest."""
    groups = tuple(tuple(FEATURE_NAMES.index(f) for f in members) for _, members in ALL_CANDIDATES)
    c = candidate_matrix(x, groups)
    t = welch(c[:n_p], c[n_p:])
    out: dict[str, float] = {}
    for label, keep in SETS.items():
        k = [NAMES.index(s) for s in keep]
        m = c[:, k].mean(axis=1, keepdims=True)
        mean_t = float(welch(m[:n_p], m[n_p:])[0])
        out[f"max_{label}"] = float(t[k].max())
        out[f"mean_{label}"] = mean_t
        out[f"maxmean_{label}"] = max(float(t[k].max()), mean_t)
    out.update({f"single_{name}": float(t[j]) for j, name in enumerate(NAMES)})
    return out


def main(argv: list[str] | None = None) -> int:
    from cdi import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m.name for m in zoo.list_models()])
    ap.add_argument("--null", type=int, default=4000)
    ap.add_argument("--positive", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(".cdi/study-cache"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from statistics_study import zoo_features

    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, int, float, dict[str, float]]] = []
    for model in args.models:
        members, held_out = zoo_features(model, args.cache)
        for n in SIZES:
            if n > len(members) or 2 * n > len(held_out):
                continue
            nulls = [statistics(held_out[rng.permutation(len(held_out))[: 2 * n]], n) for _ in range(args.null)]
            critical = {k: float(np.quantile([s[k] for s in nulls], 1.0 - args.alpha)) for k in nulls[0]}
            positives = [
                statistics(np.vstack([members[rng.choice(len(members), n, replace=False)],
                                      held_out[rng.choice(len(held_out), n, replace=False)]]), n)
                for _ in range(args.positive)
            ]
            power = {k: float(np.mean([s[k] > critical[k] for s in positives])) for k in critical}
            best = max((v, k) for k, v in power.items() if k.startswith("single_"))
            rows.append((model, n, best[0], power))
            shown = " ".join(f"{k}={v:.2f}" for k, v in power.items() if not k.startswith("single_"))
            print(f"{model} n={n}: best single {best[1][7:]} {best[0]:.2f}; {shown}", flush=True)
    print(f"\nprocedure           worst gap to the best single (where)        mean gap   "
          f"({len(rows)} model × size points)")
    for proc in (k for k in rows[0][3] if not k.startswith("single_")):
        gaps = [power[proc] - best for _, _, best, power in rows]
        w = int(np.argmin(gaps))
        print(f"{proc:18s}  {min(gaps):+.2f} ({rows[w][0]} n={rows[w][1]})".ljust(62) + f"{np.mean(gaps):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
