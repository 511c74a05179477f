"""Shift study: can ordinary differences between P and U fool the verdict? (method §8.2)

On every shipped model, full audits — test, calibrated test, controls and verdict, through
:func:`cdi.assess.assess`, exactly what ``cdi audit`` runs after extraction — resampled from
cached features and descriptors (``bench/shift_cache.py``):

- **shift scenarios without members**: P and U are disjoint sets of held-out images that
  differ by a property: split at the held-out median of a descriptor (darker / brighter P,
  less contrast, softer, simpler, thinner strokes or less colour), by class (digits 0–4
  against 5–9; tiles of one photograph against the other), by source order (the first half
  of the data set's indices against the second: the digits' writers, the photographs'
  rows), or one set transformed (JPEG re-encoded, resampled, blurred, darkened, a warm
  colour cast). Every ``used`` is false;
- **the same scenarios with members in P** (power under shift): P drawn from the members on
  P's side of the split (or transformed members), U as before; these run without the
  distribution check (``assess(distribution="never")``), which can only turn a ``used`` into
  ``inconclusive``: their ``used`` rates are upper bounds by at most its rate;
- **exchangeable sets**: null (two disjoint random held-out sets) and power (random members
  against random held-out images) at the statistics study's sizes, for the new verdict and
  for today's test alone (the raw directional test's p < α).

Per cell: ``used`` / ``inconclusive`` / ``not_detected`` with 95 % Clopper–Pearson intervals,
and how often the raw test, the calibrated test and the shift control fired. The directional
p-value is stopped after ⌈h / α⌉ permutations (as in the statistics study): whether p < α
depends only on those draws. In the cells without members the distribution check runs where
the verdict would otherwise be ``used`` (``assess(distribution="when_used")``), the only
outcome it can change, so their verdicts are exactly an audit's.

    python bench/shift_study.py [--quick] [--models ...] [--audits 100] [--table docs/shift-table.md]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy.stats import binomtest

from cdi.assess import Assessment, assess
from cdi.calibration import DESCRIPTOR_NAMES, image_descriptors
from cdi.controls import distribution_check, image_statistics
from cdi.errors import InputError
from cdi.features.layout import FeatureSet, member_candidates
from cdi.images import to_model_array
from cdi.options import DEFAULT_EXCEEDANCES
from cdi.stats import ProtocolOptions, check_sizes
from cdi.verdict import DEFAULT_ALPHA_CONTROL, DEFAULT_AUC_THRESHOLD

sys.path.insert(0, str(Path(__file__).parent))
from shift_cache import TRANSFORMS, cached

ALPHA = 0.01
SIZES = (20, 50)
EXCHANGEABLE_SIZES = (10, 20, 30, 50, 100, 200, 300)
COLUMNS = FeatureSet.GRADIENT_FREE.columns
OPTIONS = ProtocolOptions(candidates=member_candidates(COLUMNS)[1],
                          max_permutations=math.ceil(DEFAULT_EXCEEDANCES / ALPHA))


@dataclass
class Pool:
    """Images one set is drawn from: 26 features, descriptors, file statistics, identities."""

    f: np.ndarray
    d: np.ndarray
    s: np.ndarray
    ids: np.ndarray
    #: Each image's class (its digit, its photograph).
    c: np.ndarray

    def take(self, rows: np.ndarray) -> Pool:
        return Pool(self.f[rows], self.d[rows], self.s[rows], self.ids[rows], self.c[rows])


def _file(img: Image.Image, fmt: str = "PNG") -> tuple[np.ndarray, np.ndarray]:
    """The file statistics and the descriptors of one image as its owner would submit it."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 40} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    decoded = Image.open(io.BytesIO(data))
    stats = image_statistics(decoded, len(data))
    return stats, image_descriptors(to_model_array(decoded, img.size[0], 3 if img.mode == "RGB" else 1))


def statistics(name: str, cache: Path, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file statistics (:func:`cdi.controls.image_statistics`) and the descriptors
    (:func:`cdi.calibration.image_descriptors`, key suffix ``_desc``) of every cached image, cached."""
    path = cache / f"{name}-images-{len(DESCRIPTOR_NAMES)}.npz"
    if path.is_file():
        return dict(np.load(path))
    from cdi import zoo

    model = zoo.get(name)
    out: dict[str, np.ndarray] = {}

    def put(key: str, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        out[key], out[f"{key}_desc"] = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])

    put("members", [_file(model.image(i)) for i in data["members_idx"]])
    put("held", [_file(model.image(i)) for i in data["held_idx"]])
    for tname, (f, _) in TRANSFORMS.items():
        if f"{tname}_held" not in data:
            continue
        for part, idx in (("held", data["held_idx"][data["sub_held"]]),
                          ("members", data["members_idx"][data["sub_members"]])):
            if tname == "jpeg":  # the JPEG file itself is what an owner would submit
                put(f"{tname}_{part}", [_file(model.image(i), "JPEG") for i in idx])
            else:
                put(f"{tname}_{part}", [_file(f(model.image(i))) for i in idx])
    np.savez(path, **out)  # type: ignore[arg-type]
    return out


@dataclass
class Scenario:
    name: str
    #: (P pool, U pool) without members, and with members in P (None: too few members).
    null: tuple[Pool, Pool]
    positive: tuple[Pool, Pool] | None


def scenarios(data: dict[str, np.ndarray], stats: dict[str, np.ndarray], colour: bool) -> list[Scenario]:
    held = Pool(data["held"], stats["held_desc"], stats["held"], data["held_idx"], data["held_label"])
    members = Pool(data["members"], stats["members_desc"], stats["members"], -1 - data["members_idx"],
                   data["members_label"])
    out: list[Scenario] = []

    def split(name: str, key_h: np.ndarray, key_m: np.ndarray, p_low: bool) -> None:
        cut = np.median(key_h)
        low_h, low_m = key_h <= cut, key_m <= cut
        ph, uh = (low_h, ~low_h) if p_low else (~low_h, low_h)
        pm = low_m if p_low else ~low_m
        out.append(Scenario(name, (held.take(np.flatnonzero(ph)), held.take(np.flatnonzero(uh))),
                            (members.take(np.flatnonzero(pm)), held.take(np.flatnonzero(uh)))))

    def column(desc: str) -> tuple[np.ndarray, np.ndarray]:
        j = DESCRIPTOR_NAMES.index(desc)
        return stats["held_desc"][:, j], stats["members_desc"][:, j]

    split("darker P", *column("brightness"), True)
    split("brighter P", *column("brightness"), False)
    split("less contrast in P", *column("contrast"), True)
    split("softer P (edge energy)", *column("edge_energy"), True)
    split("simpler P (bytes/pixel)", *column("bytes_per_pixel"), True)
    if colour:
        split("less colourful P", *column("colourfulness"), True)
    else:
        split("thinner strokes in P (ink share)", *column("bright_share"), True)
    lh, lm = data["held_label"].astype(float), data["members_label"].astype(float)
    if colour:  # two photographs: tiles of one against the other
        split("P tiles of photograph 0", lh, lm, True)
        split("P tiles of photograph 1", lh, lm, False)
    else:
        cut_h, cut_m = (lh >= 5).astype(float), (lm >= 5).astype(float)
        split("P digits 0-4, U 5-9", cut_h, cut_m, True)
        split("P digits 5-9, U 0-4", cut_h, cut_m, False)
    split("source order (first half of the data set in P)", data["held_idx"].astype(float),
          data["members_idx"].astype(float), True)
    sub_h, sub_m = data["sub_held"], data["sub_members"]
    plain_h = held.take(sub_h)
    for tname, (_, colour_only) in TRANSFORMS.items():
        if colour_only and not colour:
            continue
        th = Pool(data[f"{tname}_held"], stats[f"{tname}_held_desc"], stats[f"{tname}_held"], plain_h.ids, plain_h.c)
        tm = Pool(data[f"{tname}_members"], stats[f"{tname}_members_desc"], stats[f"{tname}_members"],
                  members.ids[sub_m], members.c[sub_m])
        out.append(Scenario(f"P {tname}", (th, plain_h), (tm, plain_h)))
        if tname in ("jpeg", "darker"):
            out.append(Scenario(f"U {tname}", (plain_h, th), (members.take(sub_m), th)))
    return out


def draw(pools: tuple[Pool, Pool], n: int, rng: np.random.Generator) -> tuple[Pool, Pool] | None:
    """n images from each pool, never the same image in both (None: a pool is too small)."""
    p_pool, u_pool = pools
    if len(p_pool.ids) < n:
        return None
    p = p_pool.take(rng.choice(len(p_pool.ids), n, replace=False))
    free = np.flatnonzero(~np.isin(u_pool.ids, p.ids))
    if len(free) < n:
        return None
    return p, u_pool.take(rng.choice(free, n, replace=False))


@dataclass
class Cell:
    """Outcomes of the audits of one scenario, set size and kind (null / positive)."""

    outcomes: dict[str, int] = field(default_factory=lambda: {"used": 0, "inconclusive": 0, "not_detected": 0})
    raw: int = 0
    calibrated: int = 0
    shift: int = 0
    distribution_stops: int = 0
    vetoes_run: int = 0
    runs: int = 0
    #: ``used`` under the alternative rule where the descriptors' shift control vetoes only a
    #: detection the calibrated test does not confirm (the class check and the other controls
    #: as in the default).
    alternative_used: int = 0

    def add(self, a: Assessment) -> None:
        self.runs += 1
        self.outcomes[a.verdict.outcome.value] += 1
        self.raw += int(a.test.p_value < ALPHA and a.test.statistic > 0)
        self.calibrated += int(a.calibrated is not None and a.calibrated.p_value < ALPHA
                               and a.calibrated.statistic > 0)
        self.shift += int(a.shift.shifted)
        self.distribution_stops += int(a.verdict.distribution_shift)

    def rate(self, outcome: str) -> str:
        return interval(self.outcomes[outcome], self.runs)


def interval(k: int, n: int) -> str:
    if n == 0:
        return "–"
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return f"{k / n:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def alternative_used(a: Assessment, p: Pool, u: Pool, seed: int, distribution: str) -> bool:
    """Whether the alternative rule (:attr:`Cell.alternative_used`) says ``used``."""
    v = a.verdict
    if a.verdict.outcome.value == "used":
        return True
    confirmed = a.calibrated is not None and a.calibrated.p_value < ALPHA and a.calibrated.statistic > 0
    fires = a.test.p_value < ALPHA and a.test.statistic > 0
    if not (fires and confirmed) or v.negative_control_failed or v.reversal_failed or a.shift.classes_shifted:
        return False
    if v.distribution_shift:
        return False
    if distribution == "never":
        return True
    dist = distribution_check(p.s, u.s, random_state=seed + 2)
    return not (dist.p_value < DEFAULT_ALPHA_CONTROL and dist.auc >= DEFAULT_AUC_THRESHOLD)


def run_cell(pools: tuple[Pool, Pool], n: int, audits: int, rng: np.random.Generator,
             distribution: Literal["when_used", "never"], conditional: bool) -> Cell:
    cell = Cell()
    for _ in range(audits):
        drawn = draw(pools, n, rng)
        if drawn is None:
            break
        p, u = drawn
        seed = int(rng.integers(2**31))
        a = assess(p.f, u.f, p.d, u.d, p.s, u.s, columns=COLUMNS, protocol="directional", options=OPTIONS,
                   alpha=ALPHA, seed=seed, distribution=distribution,
                   classes=np.r_[p.c, u.c].tolist() if conditional else None)
        cell.add(a)
        cell.alternative_used += int(alternative_used(a, p, u, seed, distribution))
    return cell


def exchangeable(data: dict[str, np.ndarray], stats: dict[str, np.ndarray], sizes: list[int], null: int,
                 positive: int, rng: np.random.Generator, veto_sample: int,
                 conditional: bool) -> dict[str, dict[int, tuple[Cell, int]]]:
    """Null and positive cells of exchangeable sets; each with today's raw-test rejections.

    Positive audits run without the distribution check (the verdict before it); for the first
    ``veto_sample`` of them per size that end ``used`` it runs, and ``Cell.distribution_stops``
    counts how many it would have turned ``inconclusive``.
    """
    held = Pool(data["held"], stats["held_desc"], stats["held"], data["held_idx"], data["held_label"])
    members = Pool(data["members"], stats["members_desc"], stats["members"], -1 - data["members_idx"],
                   data["members_label"])
    out: dict[str, dict[int, tuple[Cell, int]]] = {"null": {}, "positive": {}}
    for kind, pools, runs in (("null", (held, held), null), ("positive", (members, held), positive)):
        for n in sizes:
            if n > len(pools[0].ids) or (kind == "null" and 2 * n > len(held.ids)):
                continue
            try:
                check_sizes(n, n, "directional", OPTIONS)
            except InputError:  # an audit refuses sets this small (its negative control needs more)
                continue
            cell, today = Cell(), 0
            for _ in range(runs):
                drawn = draw(pools, n, rng)
                assert drawn is not None
                p, u = drawn
                seed = int(rng.integers(2**31))
                a = assess(p.f, u.f, p.d, u.d, p.s, u.s, columns=COLUMNS, protocol="directional", options=OPTIONS,
                           alpha=ALPHA, seed=seed, distribution="when_used" if kind == "null" else "never",
                           classes=np.r_[p.c, u.c].tolist() if conditional else None)
                cell.add(a)
                if kind == "positive" and a.verdict.outcome.value == "used" and cell.vetoes_run < veto_sample:
                    dist = distribution_check(p.s, u.s, random_state=seed + 2)
                    cell.vetoes_run += 1
                    cell.distribution_stops += int(dist.p_value < DEFAULT_ALPHA_CONTROL
                                                   and dist.auc >= DEFAULT_AUC_THRESHOLD)
                today += int(a.test.p_value < ALPHA and a.test.statistic > 0)
            out[kind][n] = (cell, today)
    return out


def main(argv: list[str] | None = None) -> int:
    from cdi import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m.name for m in zoo.list_models()])
    ap.add_argument("--audits", type=int, default=100, help="audits per shift cell")
    ap.add_argument("--null", type=int, default=300, help="exchangeable null audits per size")
    ap.add_argument("--positive", type=int, default=100, help="exchangeable positive audits per size")
    ap.add_argument("--positive-audits", type=int, help="audits per shift cell with members in P (default --audits)")
    ap.add_argument("--veto-sample", type=int, default=10,
                    help="exchangeable positive audits per size ending used whose distribution check is run")
    ap.add_argument("--quick", action="store_true", help="20 audits per cell, 60 null, 30 positive")
    ap.add_argument("--no-exchangeable", action="store_true")
    ap.add_argument("--no-shift", action="store_true", help="only the exchangeable null and power")
    ap.add_argument("--exchangeable-sizes", nargs="+", type=int, default=list(EXCHANGEABLE_SIZES),
                    help="set sizes of the exchangeable null and power audits")
    ap.add_argument("--no-positive", action="store_true", help="skip the shift scenarios with members in P")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(".cdi/shift-cache"))
    ap.add_argument("--table", type=Path, help="write the tables as Markdown here")
    args = ap.parse_args(argv)
    if args.quick:
        args.audits, args.null, args.positive = 20, 60, 30
    start = time.perf_counter()
    lines_null = ["| model | P and U (no member) | n | used | inconclusive | not_detected | raw test fired | "
                  "calibrated fired | shift control | used, alternative rule |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    lines_pos = ["| model | P (members) and U | n | used (before the distribution check) | inconclusive | "
                 "not_detected | used, alternative rule |", "|---|---|---|---|---|---|---|"]
    pooled_alt = [0, 0]
    lines_ex = ["| model | n | null: used (new) | null: today's test | null: inconclusive | power: used (new) | "
                "power: today's test | power: inconclusive |", "|---|---|---|---|---|---|---|---|"]
    pooled = [0, 0]
    worst = (0.0, "")
    for name in args.models:
        t0 = time.perf_counter()
        data = cached(name, args.cache)
        stats = statistics(name, args.cache, data)
        colour = zoo.get(name).image_channels == 3
        conditional = zoo.get(name).conditioning == "class"
        rng = np.random.default_rng([args.seed, sum(map(ord, name))])
        print(f"\n== {name}", flush=True)
        for sc in [] if args.no_shift else scenarios(data, stats, colour):
            for n in SIZES:
                cell = run_cell(sc.null, n, args.audits, rng, "when_used", conditional)
                if cell.runs == 0:
                    continue
                pooled[0] += cell.outcomes["used"]
                pooled[1] += cell.runs
                share = cell.outcomes["used"] / cell.runs
                if share >= worst[0]:
                    worst = (share, f"{name}, {sc.name}, n = {n}")
                row = (f"| {name} | {sc.name} | {n} | {cell.rate('used')} | {cell.rate('inconclusive')} | "
                       f"{cell.rate('not_detected')} | {cell.raw / cell.runs:.2f} | "
                       f"{cell.calibrated / cell.runs:.2f} | {cell.shift / cell.runs:.2f} | "
                       f"{interval(cell.alternative_used, cell.runs)} |")
                pooled_alt[0] += cell.alternative_used
                pooled_alt[1] += cell.runs
                lines_null.append(row)
                print(f"null  {sc.name:48s} n={n:3d} ({cell.runs}) used {cell.rate('used')}  inconcl "
                      f"{cell.rate('inconclusive')}  raw {cell.raw}  cal {cell.calibrated}  shift {cell.shift}  "
                      f"dist-stops {cell.distribution_stops}  alt-used {cell.alternative_used}", flush=True)
                if args.no_positive or sc.positive is None:
                    continue
                pcell = run_cell(sc.positive, n, args.positive_audits or args.audits, rng, "never", conditional)
                if pcell.runs == 0:
                    continue
                lines_pos.append(f"| {name} | {sc.name} | {n} | {pcell.outcomes['used'] / pcell.runs:.2f} | "
                                 f"{pcell.outcomes['inconclusive'] / pcell.runs:.2f} | "
                                 f"{pcell.outcomes['not_detected'] / pcell.runs:.2f} | "
                                 f"{pcell.alternative_used / pcell.runs:.2f} |")
                print(f"power {sc.name:48s} n={n:3d} ({pcell.runs}) used {pcell.outcomes['used'] / pcell.runs:.2f}  "
                      f"inconcl {pcell.outcomes['inconclusive'] / pcell.runs:.2f}  raw {pcell.raw}  "
                      f"cal {pcell.calibrated}  alt-used {pcell.alternative_used}", flush=True)
        if not args.no_exchangeable:
            ex = exchangeable(data, stats, args.exchangeable_sizes, args.null, args.positive, rng, args.veto_sample,
                              conditional)
            for n in sorted(set(ex["null"]) | set(ex["positive"])):
                cells = [ex[k].get(n) for k in ("null", "positive")]
                parts = []
                for got in cells:
                    if got is None:
                        parts += ["–", "–", "–"]
                        continue
                    c, today = got
                    parts += [c.rate("used") if got is cells[0] else f"{c.outcomes['used'] / c.runs:.2f}",
                              interval(today, c.runs) if got is cells[0] else f"{today / c.runs:.2f}",
                              f"{c.outcomes['inconclusive'] / c.runs:.3f}"
                              + (f" (+{c.distribution_stops}/{c.vetoes_run} by the distribution check)"
                                 if c.vetoes_run else "")]
                lines_ex.append(f"| {name} | {n} | " + " | ".join(parts) + " |")
                print(f"exch  n={n:3d} " + "  ".join(parts), flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = (f"pooled false `used` over every shift cell: {pooled[0]} in {pooled[1]} audits: "
               f"{interval(*pooled)}; worst cell {worst[0]:.3f} ({worst[1]}); alternative rule: "
               f"{pooled_alt[0]} in {pooled_alt[1]}; "
               f"run time {time.perf_counter() - start:.0f} s")
    print("\n" + summary)
    if args.table:
        args.table.write_text("\n".join(lines_null) + "\n\n" + "\n".join(lines_pos) + "\n\n" + "\n".join(lines_ex)
                              + "\n\n" + summary + "\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
