"""Statistics study: false-positive rate and power of the audit's test on every shipped model.

Features of every member and held-out image are computed once per model (and cached in
``--cache``); then many audits are resampled from them:

- null audits: P and U are two disjoint random sets of held-out images (the model never saw
  either), so every "detection" is a false positive;
- positive audits: P is a random set of members, U of held-out images.

For every model it prints the false-positive rate at α = 0.01 and 0.05 with 95 %
Clopper–Pearson intervals over ``--null`` audits, and, at each set size, the power at
α = 0.01 of the default protocol, of the other protocols asked for, and of every single
loss-type feature on its own (one-sided Welch test, "P's values lower", the feature chosen
in hindsight: the best of them is the bar the default must reach), then the smallest n with
90 % power for each. ``--table`` also writes the summary as a Markdown table.

The directional protocol's sequential p-value is stopped after ⌈h / 0.01⌉ permutations:
whether p < 0.01 or p < 0.05 depends only on those draws, so the rates are the ones of the
full procedure, which goes on to resolve small p-values further.

    python bench/statistics_study.py [--models ...] [--null 1000] [--positive 200] [--protocols directional reference]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as sps
from scipy.stats import binomtest

from cdi.features.layout import FEATURE_NAMES, MEMBER_LOWER, FeatureSet, member_candidates
from cdi.options import DEFAULT_EXCEEDANCES, DEFAULT_PROTOCOL, Protocol, ProtocolOptions
from cdi.stats import run_test

SIZES = (10, 20, 30, 50, 100)
#: Also studied where a model has that many members: weak models reach 90 % power only there.
LARGE_SIZES = (200, 300)
ALPHAS = (0.01, 0.05)


def zoo_features(name: str, cache: Path, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """All 26 features of the model's members and held-out images, computed once and cached."""
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
    return f"{k / n:.4f} [{ci.low:.4f}, {ci.high:.4f}]" if n > 20_000 else f"{k / n:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


@dataclass
class Power:
    """Rejections at α = 0.01 per method and set size."""

    runs: int
    rejections: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, method: str, n: int, rejected: bool) -> None:
        self.rejections.setdefault(method, {}).setdefault(n, 0)
        self.rejections[method][n] += int(rejected)

    def power(self, method: str, n: int) -> float:
        return self.rejections[method][n] / self.runs

    def smallest(self, method: str, sizes: list[int]) -> int | None:
        return next((n for n in sizes if self.power(method, n) >= 0.9), None)


def draw(pool_p: np.ndarray, pool_u: np.ndarray, n: int, rng: np.random.Generator,
         null: bool) -> tuple[np.ndarray, np.ndarray]:
    if null:  # P and U from the held-out pool, without overlap
        idx = rng.permutation(len(pool_u))[: 2 * n]
        return pool_u[idx[:n]], pool_u[idx[n:]]
    return pool_p[rng.choice(len(pool_p), n, replace=False)], pool_u[rng.choice(len(pool_u), n, replace=False)]


def study(name: str, args: argparse.Namespace) -> dict[str, object]:
    members, held_out = zoo_features(name, args.cache)
    cols = FeatureSet(args.features).columns
    members, held_out = members[:, cols], held_out[:, cols]
    names = [FEATURE_NAMES[c] for c in cols]
    single = [i for i, f in enumerate(names) if f in MEMBER_LOWER]
    options = ProtocolOptions(
        n_permutations=args.permutations, candidates=member_candidates(cols)[1],
        max_permutations=math.ceil(DEFAULT_EXCEEDANCES / min(ALPHAS)),
    )
    protocols = [Protocol(p) for p in args.protocols]
    print(f"\n== {name}: {len(members)} members, {len(held_out)} held out; features {args.features}; "
          f"default protocol {DEFAULT_PROTOCOL.value}", flush=True)

    def p_value(protocol: Protocol, xp: np.ndarray, xu: np.ndarray, rng: np.random.Generator) -> float:
        return run_test(xp, xu, protocol, options, alpha=0.01, random_state=int(rng.integers(2**31))).p_value

    n_null = min(args.null_size, len(held_out) // 2)
    fpr: dict[str, dict[float, tuple[int, int]]] = {}
    for protocol in [p for p in protocols if p.value in args.null_protocols]:
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        ps = np.array([p_value(protocol, *draw(members, held_out, n_null, rng, True), rng) for _ in range(args.null)])
        fpr[protocol.value] = {a: (int((ps < a).sum()), args.null) for a in ALPHAS}
        print(f"{protocol.value:11s} null, {args.null} audits of {n_null}+{n_null}: "
              + "  ".join(f"FPR@{a} {interval(int((ps < a).sum()), args.null)}" for a in ALPHAS)
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)

    sizes = [n for n in (args.sizes or SIZES + LARGE_SIZES) if n <= len(members) and n <= len(held_out)]
    power = Power(args.positive)
    rng = np.random.default_rng(args.seed + 1)
    start = time.perf_counter()
    for n in sizes:
        for _ in range(args.positive):
            xp, xu = draw(members, held_out, n, rng, False)
            for protocol in protocols:
                power.add(protocol.value, n, p_value(protocol, xp, xu, rng) < 0.01)
            welch = sps.ttest_ind(xu[:, single], xp[:, single], equal_var=False, alternative="greater").pvalue
            for j, p in zip(single, np.atleast_1d(welch), strict=True):
                power.add(names[j], n, bool(p < 0.01))
    best = {n: max((names[j] for j in single), key=lambda f, n=n: power.power(f, n)) for n in sizes}
    print(f"power at α = 0.01 over {args.positive} positive audits per size ({time.perf_counter() - start:.0f} s):")
    print(f"{'n per set':>22s} " + " ".join(f"{n:>6d}" for n in sizes) + "   smallest n with 90 %")
    for method in [p.value for p in protocols]:
        smallest = power.smallest(method, sizes)
        print(f"{method:>22s} " + " ".join(f"{power.power(method, n):6.2f}" for n in sizes)
              + f"   {smallest or '> ' + str(sizes[-1])}")
    print(f"{'best single (hindsight)':>22s} " + " ".join(f"{power.power(best[n], n):6.2f}" for n in sizes))
    print(f"{'which':>22s} " + " ".join(f"{best[n][:6]:>6s}" for n in sizes))
    ranked = sorted((names[j] for j in single), key=lambda f: -sum(power.power(f, n) for n in sizes))
    for f in ranked[: args.show_features]:
        smallest = power.smallest(f, sizes)
        print(f"{f:>22s} " + " ".join(f"{power.power(f, n):6.2f}" for n in sizes)
              + f"   {smallest or '> ' + str(sizes[-1])}")
    return {"name": name, "fpr": fpr, "power": power, "sizes": sizes, "best": best, "n_null": n_null}


def markdown(results: list[dict[str, object]], default: str) -> str:
    lines = [
        f"| model | FPR@0.01, {default} | FPR@0.05 | n | {default} | reference | best single feature "
        f"(hindsight) | smallest n for 90 %: {default} / best single |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if default not in r["fpr"]:  # type: ignore[operator]
            continue
        power: Power = r["power"]  # type: ignore[assignment]
        sizes: list[int] = r["sizes"]  # type: ignore[assignment]
        best: dict[int, str] = r["best"]  # type: ignore[assignment]
        fpr: dict[str, dict[float, tuple[int, int]]] = r["fpr"]  # type: ignore[assignment]
        k1, n1 = fpr[default][0.01]
        k5, n5 = fpr[default][0.05]
        best_smallest = next((n for n in sizes if power.power(best[n], n) >= 0.9), None)
        for i, n in enumerate(sizes):
            ref = f"{power.power('reference', n):.2f}" if "reference" in power.rejections else "–"
            head = (f"| {r['name']} | {interval(k1, n1)} | {interval(k5, n5)} " if i == 0 else "| | | ")
            tail = (f"| {power.smallest(default, sizes) or '>' + str(sizes[-1])} / "
                    f"{best_smallest or '>' + str(sizes[-1])} |" if i == 0 else "| |")
            lines.append(f"{head}| {n} | {power.power(default, n):.2f} | {ref} | "
                         f"{power.power(best[n], n):.2f} ({best[n]}) {tail}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cdi import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m.name for m in zoo.list_models()])
    ap.add_argument("--null", type=int, default=3000, help="null audits per protocol in --null-protocols")
    ap.add_argument("--null-protocols", nargs="+", choices=[p.value for p in Protocol],
                    default=[DEFAULT_PROTOCOL.value], help="the protocols whose false-positive rate is measured")
    ap.add_argument("--null-size", type=int, default=50, help="images per set in null audits")
    ap.add_argument("--positive", type=int, default=200, help="positive audits per set size")
    ap.add_argument("--permutations", type=int, default=999, help="crossfit permutations per audit")
    ap.add_argument("--protocols", nargs="+", choices=[p.value for p in Protocol],
                    default=[DEFAULT_PROTOCOL.value, Protocol.REFERENCE.value], help="the protocols to study")
    ap.add_argument("--sizes", nargs="+", type=int,
                    help=f"set sizes of the positive audits (default {SIZES}, and {LARGE_SIZES} where members allow)")
    ap.add_argument("--features", choices=["all", "gradient-free"], default="all")
    ap.add_argument("--show-features", type=int, default=6, help="single features listed per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(".cdi/study-cache"))
    ap.add_argument("--table", type=Path, help="write the summary as a Markdown table here")
    args = ap.parse_args(argv)
    if DEFAULT_PROTOCOL.value not in args.protocols:
        args.protocols.insert(0, DEFAULT_PROTOCOL.value)
    results = [study(name, args) for name in args.models]
    pooled = [r["fpr"][DEFAULT_PROTOCOL.value] for r in results if DEFAULT_PROTOCOL.value in r["fpr"]]  # type: ignore[operator]
    if len(pooled) > 1:
        for a in ALPHAS:
            k, n = sum(f[a][0] for f in pooled), sum(f[a][1] for f in pooled)
            print(f"all {len(pooled)} models, {DEFAULT_PROTOCOL.value}: {k} false positives in {n} null audits "
                  f"at α = {a}: {interval(k, n)}")
    if args.table:
        args.table.write_text(markdown(results, DEFAULT_PROTOCOL.value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
