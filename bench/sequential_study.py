"""Sequential audits against the fixed design, on the shipped models' cached features.

For every model and set size n it resamples audits from the features of
``bench/statistics_study.py`` (same cache, same draws):

- null audits (``--null`` per size): P and U two disjoint random sets of held-out images;
- positive audits (``--positive`` per size): P random members, U random held-out images;

and runs on each the fixed design (the directional test on all n + n images at α) and every
sequential design asked for (``--designs``: looks × spending rule, with or without
futility), in the audit's own code (:func:`cdi.sequential.sequential_test`; the controls are
taken to pass, as the fixed design's rate is measured without them too). It prints the
false-positive rate with its 95 % Clopper–Pearson interval, the power, and the average share
of the images a design used (extracted before it stopped), all at α = ``--alpha``.

    python bench/sequential_study.py --cache .cdi/study-cache [--models ...] [--sizes 10 20 30 50] [--table T]
    python bench/sequential_study.py --compact T      # one line per model and size, pooled rates
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from statistics_study import draw, interval, zoo_features

from cdi.features.layout import FeatureSet, member_candidates
from cdi.options import DEFAULT_EXCEEDANCES, ProtocolOptions, SequentialOptions, Spending
from cdi.sequential import design, sequential_test
from cdi.stats import directional_test

SIZES = (10, 20, 30, 50)


@dataclass(frozen=True)
class Design:
    """A design of the study: ``looks`` = 1 is the fixed design."""

    looks: int
    spending: Spending
    futility: bool

    @property
    def name(self) -> str:
        if self.looks == 1:
            return "fixed"
        return f"{self.looks} looks {self.spending.value}" + (" +futility" if self.futility else "")


def parse_design(text: str) -> Design:
    """``fixed`` or ``LOOKS:RULE[:futility]``, e.g. ``4:pocock`` or ``3:obrien-fleming:futility``."""
    if text == "fixed":
        return Design(1, Spending.POCOCK, False)
    parts = text.split(":")
    try:
        return Design(int(parts[0]), Spending(parts[1]), len(parts) > 2 and parts[2] == "futility")
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"not a design: {text!r} (e.g. fixed, 4:pocock, 3:obrien-fleming:futility)") from None


@dataclass
class Tally:
    audits: int = 0
    rejected: int = 0
    used: float = 0.0

    def add(self, rejected: bool, fraction: float) -> None:
        self.audits += 1
        self.rejected += int(rejected)
        self.used += fraction


def run(d: Design, xp: np.ndarray, xu: np.ndarray, options: ProtocolOptions, alpha: float,
        seed: int) -> tuple[bool, float]:
    """Whether design ``d`` rejects at ``alpha``, and the share of the images it used."""
    if d.looks == 1:
        return directional_test(xp, xu, options, alpha=alpha, random_state=seed).p_value < alpha, 1.0
    plan = design(len(xp), len(xu), SequentialOptions(True, d.looks, d.spending, d.futility), alpha,
                  floor=1.0 / (1 + options.max_permutations))
    result = sequential_test(xp, xu, plan, options, random_state=seed)
    return result.p_value < alpha and result.test.statistic > 0, (result.n_p + result.n_u) / (len(xp) + len(xu))


def study(name: str, args: argparse.Namespace) -> list[str]:
    members, held_out = zoo_features(name, args.cache)
    cols = FeatureSet.ALL.columns
    members, held_out = members[:, cols], held_out[:, cols]
    # The fixed design's decision depends only on the first ⌈h / α⌉ permutations; the
    # sequential looks cap their own (cdi.sequential.look_options) from the default 10⁶.
    fixed_options = ProtocolOptions(candidates=member_candidates(cols)[1],
                                    max_permutations=math.ceil(DEFAULT_EXCEEDANCES / args.alpha))
    seq_options = ProtocolOptions(candidates=member_candidates(cols)[1])
    print(f"\n== {name}: {len(members)} members, {len(held_out)} held out; α = {args.alpha}", flush=True)
    rows = []
    for n in [n for n in args.sizes if n <= len(members) and 2 * n <= len(held_out)]:
        start = time.perf_counter()
        null = {d: Tally() for d in args.designs}
        pos = {d: Tally() for d in args.designs}
        for tallies, count, is_null, seed in ((null, args.null, True, args.seed), (pos, args.positive, False,
                                                                                     args.seed + 1)):
            rng = np.random.default_rng([seed, n])
            for _ in range(count):
                xp, xu = draw(members, held_out, n, rng, is_null)
                s = int(rng.integers(2**31))
                for d in args.designs:
                    opts = fixed_options if d.looks == 1 else seq_options
                    tallies[d].add(*run(d, xp, xu, opts, args.alpha, s))
        for d in args.designs:
            a, b = null[d], pos[d]
            line = (f"| {name} | {n} | {d.name} | {interval(a.rejected, a.audits)} | {b.rejected / b.audits:.2f} "
                    f"| {b.used / b.audits:.2f} | {a.used / a.audits:.2f} |")
            rows.append(line)
            print(line, flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def compact(lines: list[str], null_audits: int) -> str:
    """The rows of ``--table`` as one line per model and size (power · share of images used,
    per design), followed by each design's false-positive rate pooled over all the rows."""
    cells: dict[tuple[str, str], dict[str, tuple[str, str, str]]] = {}
    designs: list[str] = []
    pooled: dict[str, int] = {}
    for line in lines:
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(parts) != 7 or not parts[1].isdigit():
            continue
        model, n, d, fpr, power, used_p, used_n = parts
        if d not in designs:
            designs.append(d)
        cells.setdefault((model, n), {})[d] = (power, used_p, used_n)
        pooled[d] = pooled.get(d, 0) + round(float(fpr.split()[0]) * null_audits)
    out = ["| model | n per set | " + " | ".join(designs) + " |", "|---|---|" + "---|" * len(designs)]
    for (model, n), row in cells.items():
        shown = []
        for d in designs:
            power, used_p, used_n = row.get(d, ("–", "–", "–"))
            cell = power if d == "fixed" else f"{power} · {used_p}"
            shown.append(cell + (f" (null {used_n})" if "futility" in d else ""))
        out.append(f"| {model} | {n} | " + " | ".join(shown) + " |")
    total = null_audits * len(cells)
    out.append("")
    out += [f"- {d}: {k}/{total} = {interval(k, total)}" for d, k in pooled.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from cdi import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m.name for m in zoo.list_models()])
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="images per set")
    ap.add_argument("--designs", nargs="+", type=parse_design,
                    default=[parse_design(t) for t in ("fixed", "2:pocock", "3:pocock", "4:pocock", "4:obrien-fleming",
                                                         "4:pocock:futility")])
    ap.add_argument("--null", type=int, default=300, help="null audits per size")
    ap.add_argument("--positive", type=int, default=100, help="positive audits per size")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(".cdi/study-cache"))
    ap.add_argument("--table", type=Path, help="append the Markdown table here")
    ap.add_argument("--compact", type=Path, metavar="TABLE",
                    help="only summarise a --table file: power · images used per model and size, pooled rates")
    args = ap.parse_args(argv)
    if args.compact:
        print(compact(args.compact.read_text().splitlines(), args.null))
        return 0
    head = ["| model | n per set | design | FPR [95 % CI] | power | images used (positive) | images used (null) |",
            "|---|---|---|---|---|---|---|"]
    print("\n".join(head))
    rows = [r for name in args.models for r in study(name, args)]
    if args.table:
        with args.table.open("a") as f:
            f.write("\n".join(head + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
