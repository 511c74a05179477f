"""Statistics study: false-positive rate and power of both protocols on the shipped models.

Features of every member and held-out digit are computed once per model (and cached in
``--cache``); then many audits are resampled from them:

- null audits: P and U are two disjoint random sets of held-out digits (the model never saw
  either), so every "detection" is a false positive;
- positive audits: P is a random set of members, U of held-out digits.

For each protocol it prints the false-positive rate at α = 0.01 and 0.05 with 95 %
Clopper–Pearson intervals, the power against the set size, and the smallest set size that
reaches 90 % power at α = 0.01.

    python bench/statistics_study.py [--models digits-memorised digits-hard] [--null 200] [--positive 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from cdi.features.layout import FeatureSet
from cdi.stats import Protocol, ProtocolOptions, run_test

SIZES = {
    "digits-memorised": (10, 15, 20, 30, 50, 75, 100),
    "digits-hard": (25, 50, 100, 150, 200, 300),
    "digits-latent": (10, 20, 30, 50, 100),
    "digits-dit": (10, 20, 30, 50, 100),
    "digits-latent-class": (10, 20, 30, 50, 100),
    "digits-flip": (10, 20, 30, 50, 100),
    "photos-rgb": (10, 20, 30, 50, 100),
}


def zoo_features(name: str, cache: Path, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """All 26 features of the model's members and held-out digits, computed once and cached."""
    path = cache / f"{name}.npz"
    if path.is_file():
        data = np.load(path)
        return data["members"], data["held_out"]
    from cdi import zoo
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput
    from cdi.images import to_model_array
    from cdi.models import load_model

    model = zoo.get(name)
    prefix = zoo.DATASETS[model.dataset].PREFIX
    adapter = load_model(name)
    extractor = FeatureExtractor(adapter, seed=0, batch_size=batch_size)

    def items(indices: tuple[int, ...]) -> list[ExtractionInput]:
        return [
            ExtractionInput(
                f"{prefix}-{i}", to_model_array(model.image(i), model.image_size, model.image_channels),
                model.label(i) if model.conditioning == "class" else None,
            )
            for i in indices
        ]

    start = time.perf_counter()
    members = extractor.extract(items(model.members))
    held_out = extractor.extract(items(model.held_out))
    print(f"  features of {len(members)} + {len(held_out)} images in {time.perf_counter() - start:.0f} s",
          flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, members=members, held_out=held_out)
    return members, held_out


def interval(k: int, n: int) -> str:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return f"{k / n:6.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def p_values(pool_p: np.ndarray, pool_u: np.ndarray, n: int, runs: int, protocol: Protocol,
             options: ProtocolOptions, rng: np.random.Generator, disjoint: bool) -> np.ndarray:
    out = np.empty(runs)
    for r in range(runs):
        if disjoint:  # null: P and U from the same pool, without overlap
            idx = rng.permutation(len(pool_u))[: 2 * n]
            xp, xu = pool_u[idx[:n]], pool_u[idx[n:]]
        else:
            xp = pool_p[rng.choice(len(pool_p), n, replace=False)]
            xu = pool_u[rng.choice(len(pool_u), n, replace=False)]
        out[r] = run_test(xp, xu, protocol, options, alpha=0.01, random_state=int(rng.integers(2**31))).p_value
    return out


def study(name: str, args: argparse.Namespace) -> None:
    members, held_out = zoo_features(name, args.cache)
    cols = FeatureSet(args.features).columns
    members, held_out = members[:, cols], held_out[:, cols]
    options = ProtocolOptions(n_permutations=args.permutations)
    print(f"\n== {name}: {len(members)} members, {len(held_out)} held out; features {args.features}; "
          f"crossfit with {args.permutations} permutations")
    n_null = min(args.null_size, len(held_out) // 2)
    for protocol in (Protocol(p) for p in args.protocols):
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        null = p_values(members, held_out, n_null, args.null, protocol, options, rng, disjoint=True)
        print(f"{protocol.value:9s} null, {args.null} audits of {n_null}+{n_null}: "
              f"FPR@0.01 {interval(int((null < 0.01).sum()), args.null)}  "
              f"FPR@0.05 {interval(int((null < 0.05).sum()), args.null)}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        smallest = None
        for n in args.sizes or SIZES.get(name, (10, 20, 50, 100)):
            if n > len(members) or 2 * n > len(held_out):
                continue
            pos = p_values(members, held_out, n, args.positive, protocol, options, rng, disjoint=False)
            power = float((pos < 0.01).mean())
            if smallest is None and power >= 0.9:
                smallest = n
            print(f"{'':9s} n = {n:3d} per set: power@0.01 {power:5.2f}  power@0.05 {(pos < 0.05).mean():5.2f}  "
                  f"median p {np.median(pos):.2g}", flush=True)
        print(f"{'':9s} smallest n reaching 90 % power at α = 0.01: {smallest or 'none of those tried'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-memorised", "digits-hard"])
    ap.add_argument("--null", type=int, default=200, help="null audits per protocol")
    ap.add_argument("--null-size", type=int, default=50, help="images per set in null audits")
    ap.add_argument("--positive", type=int, default=100, help="positive audits per set size")
    ap.add_argument(
        "--permutations", type=int, default=199,
        help="crossfit permutations per audit (the audit default is 999; with 199 the smallest "
             "p-value is 0.005, which understates power at α = 0.01, but the study runs 5× faster)",
    )
    ap.add_argument("--protocols", nargs="+", choices=[p.value for p in Protocol],
                    default=[p.value for p in Protocol], help="the protocols to study")
    ap.add_argument("--sizes", nargs="+", type=int, help="set sizes of the positive audits (default: per model)")
    ap.add_argument("--features", choices=["all", "gradient-free"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(".cdi/study-cache"))
    args = ap.parse_args(argv)
    for name in args.models:
        study(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
