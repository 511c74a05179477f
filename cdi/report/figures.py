"""The report's figures, drawn with matplotlib (object API, no pyplot: no global state).

Each function returns PNG bytes; the renderer places them. Figures depend only on their
arguments, so the same report gives the same pictures.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cdi.report.curve import SubsamplingCurve
    from cdi.report.model import Report

__all__ = ["COLOURS", "distribution_check", "negative_control", "p_value_scale", "score_distributions", "subsampling"]

COLOURS = {"P": "#c0392b", "U": "#2c6e9b", "alpha": "#555555", "band": "#e6b0aa", "neutral": "#7f8c8d"}
DPI = 200
WIDTH_IN = 6.7


def _figure(height: float, ncols: int = 1, nrows: int = 1, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.ravel():
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No software tag, so that the bytes depend on the data only.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _bins(values: Sequence[np.ndarray], n: int = 24) -> np.ndarray:
    pooled = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    lo, hi = float(pooled.min()), float(pooled.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n + 1)


def _two_histograms(ax: Any, a: np.ndarray, b: np.ndarray, labels: tuple[str, str],
                    colours: tuple[str, str], xlabel: str) -> None:
    bins = _bins([a, b])
    for values, label, colour in ((a, labels[0], colours[0]), (b, labels[1], colours[1])):
        ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.25, color=colour)
        ax.hist(values, bins=bins, histtype="step", linewidth=1.4, color=colour, label=label)
        ax.axvline(float(np.mean(values)), color=colour, linestyle="--", linewidth=1.1)
    # Every image as a tick below the histograms (a rug), so that small sets stay readable.
    ymax = ax.get_ylim()[1]
    for k, (values, colour) in enumerate(((a, colours[0]), (b, colours[1]))):
        y = -ymax * (0.06 + 0.07 * k)
        ax.plot(values, np.full(len(values), y), "|", color=colour, markersize=7, alpha=0.8)
    ax.set_ylim(-ymax * 0.2, ymax * 1.05)
    from matplotlib.ticker import MaxNLocator

    ax.set_yticks([t for t in MaxNLocator(nbins=5, integer=True).tick_values(0, ymax) if 0 <= t <= ymax * 1.05])
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("number of images", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2)


def score_distributions(report: Report) -> bytes:
    """Figure: histograms of P's and U's test scores, with their means (dashed) and every image."""
    from cdi.report.scores import score_axis

    sp = np.array([r.score for r in report.rows("P") if r.role == "test"], dtype=np.float64)
    su = np.array([r.score for r in report.rows("U") if r.role == "test"], dtype=np.float64)
    fig, axes = _figure(2.9)
    ax = axes[0, 0]
    _two_histograms(ax, sp, su, (f"P, published ({len(sp)} images)", f"U, unpublished ({len(su)} images)"),
                    (COLOURS["P"], COLOURS["U"]), score_axis(report.test.protocol, report.test.selected_feature))
    return _png(fig)


def _p_axis(ax: Any, floor: float) -> None:
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.3)


def subsampling(report: Report, curve: SubsamplingCurve) -> bytes:
    """Figure: median p-value (and 10–90 % band) of random subsamples against their size, with α."""
    sizes = np.asarray(curve.sizes_p, dtype=np.float64)
    floor = 10 ** math.floor(math.log10(max(min(float(curve.p_values.min()), report.p_value, curve.alpha) / 3,
                                            1e-300)))
    fig, axes = _figure(3.6, nrows=2, gridspec_kw={"height_ratios": [3, 1.1]}, sharex=True)
    ax, bar = axes[0, 0], axes[1, 0]
    if len(sizes) > 1:
        ax.fill_between(sizes, curve.low, curve.high, color=COLOURS["band"], alpha=0.6, linewidth=0,
                        label="10–90 % of subsamples")
    else:
        ax.vlines(sizes, curve.low, curve.high, color=COLOURS["band"], linewidth=6, label="10–90 % of subsamples")
    ax.plot(sizes, curve.median, "o-", color=COLOURS["P"], markersize=4, linewidth=1.5, label="median p-value")
    ax.axhline(curve.alpha, color=COLOURS["alpha"], linestyle="--", linewidth=1.1)
    ax.text(sizes[0], curve.alpha * 1.15, f" α = {curve.alpha:g}", fontsize=8, color=COLOURS["alpha"], va="bottom")
    if curve.n_permutations:
        smallest = 1.0 / (1 + curve.n_permutations)
        ax.axhline(smallest, color=COLOURS["neutral"], linestyle=":", linewidth=1.0)
        ax.text(sizes[-1], smallest * 0.85, f"smallest p-value with {curve.n_permutations} permutations ",
                fontsize=7, color=COLOURS["neutral"], ha="right", va="top")
    ax.plot([report.test.n_p], [report.p_value], marker="*", markersize=12, color="black", linestyle="none",
            label=f"this audit: p = {report.p_value:.3g}")
    _p_axis(ax, floor)
    ax.set_ylabel("p-value (log scale)", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3)
    width = max(1.0, 0.6 * float(np.min(np.diff(sizes)))) if len(sizes) > 1 else 1.5
    if len(sizes) == 1:
        ax.set_xlim(sizes[0] - 8, sizes[0] + 8)
    share = curve.fraction_significant
    bar.bar(sizes, share, width=width, color=COLOURS["neutral"])
    for x, f in zip(sizes, share, strict=True):
        bar.text(x, f + 0.04, f"{round(f * curve.draws)}/{curve.draws}", fontsize=7, ha="center", va="bottom")
    bar.set_ylim(0, 1.45)
    bar.set_yticks([0, 0.5, 1])
    bar.set_ylabel("share\np < α", fontsize=8)
    bar.set_xlabel("images in P per audit (U subsampled in proportion)", fontsize=9)
    bar.set_xticks(sizes, [f"{p}\n{u}" if u != p else f"{p}" for p, u in zip(curve.sizes_p, curve.sizes_u,
                                                                                 strict=True)])
    if any(u != p for p, u in zip(curve.sizes_p, curve.sizes_u, strict=True)):
        bar.text(1.0, -0.55, "P / U", transform=bar.transAxes, fontsize=7, ha="right", va="top")
    return _png(fig)


def _p_scale(ax: Any, entries: Sequence[tuple[str, float, str]], alpha: float) -> None:
    """A horizontal log-scale p-value axis with α and one labelled marker per entry."""
    smallest = min(p for _, p, _ in entries)
    floor = 10 ** math.floor(math.log10(max(min(smallest, alpha) / 3, 1e-300)))
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.5)
    ax.axvspan(floor, alpha, color=COLOURS["band"], alpha=0.35, linewidth=0)
    ax.axvline(alpha, color=COLOURS["alpha"], linestyle="--", linewidth=1.1)
    ax.text(alpha, len(entries) - 0.35, f"α = {alpha:g} ", fontsize=8, ha="right", color=COLOURS["alpha"])
    for i, (label, p, colour) in enumerate(entries):
        y = len(entries) - 1 - i
        ax.plot([p], [y], "o", color=colour, markersize=8)
        ax.text(p, y - 0.32, f"{label}\np = {p:.3g}", fontsize=7.5, ha="center", va="top")
    ax.set_ylim(-1.1, len(entries) - 0.2)
    ax.set_yticks([])
    ax.spines["left"].set_visible(False)
    ax.set_xlabel("p-value (log scale); shaded: below α", fontsize=8.5)


def p_value_scale(report: Report) -> bytes:
    """Figure for page 1: the audit's p-value on a log scale against the threshold α."""
    from matplotlib.figure import Figure

    p, alpha = report.p_value, report.alpha
    floor = 10 ** math.floor(math.log10(max(min(p, alpha) / 3, 1e-300)))
    fig = Figure(figsize=(5.6, 0.95), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.5)
    ax.set_ylim(0, 1)
    ax.axvspan(floor, alpha, color=COLOURS["band"], alpha=0.45, linewidth=0)
    ax.axvline(alpha, color=COLOURS["alpha"], linestyle="--", linewidth=1.1)
    ax.text(alpha, 0.93, f" threshold α = {alpha:g}", fontsize=7.5, color=COLOURS["alpha"], va="top")
    ax.text(floor * 1.15, 0.93, "evidence (p < α)", fontsize=7.5, color=COLOURS["P"], va="top")
    ax.plot([p], [0.35], "D", color="black", markersize=7)
    right = math.log10(p) < (math.log10(floor) + math.log10(1.5)) / 2
    ax.annotate(f"this audit: p = {p:.3g}", (p, 0.35), xytext=(8 if right else -8, 0), textcoords="offset points",
                fontsize=8, va="center", ha="left" if right else "right", fontweight="bold",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=7.5)
    ax.set_xlabel("p-value, log scale (smaller: stronger evidence of training on P)", fontsize=7.5)
    return _png(fig)


def negative_control(report: Report) -> bytes:
    """Figure: the negative control's two halves of U, and where its p-value falls against α."""
    nc = report.controls.negative_control
    a = np.array([r.score for r in nc.rows if r.plays == "P" and r.role == "test"], dtype=np.float64)
    b = np.array([r.score for r in nc.rows if r.plays == "U" and r.role == "test"], dtype=np.float64)
    fig, axes = _figure(2.8, ncols=2, width_ratios=[1.6, 1])
    _two_histograms(axes[0, 0], a, b, (f"U, half A ({len(a)} images)", f"U, half B ({len(b)} images)"),
                    (COLOURS["U"], COLOURS["neutral"]), "score in the control test")
    entries = [("audit test", report.p_value, COLOURS["P"]), ("negative control", nc.p_value, COLOURS["U"])]
    if report.controls.direction_check.p_value is not None:
        entries.append(("direction check", report.controls.direction_check.p_value, COLOURS["neutral"]))
    _p_scale(axes[0, 1], entries, report.alpha)
    return _png(fig)


def distribution_check(report: Report) -> bytes:
    """Figure: the model-free classifier's AUC against chance and the threshold, and the statistics
    that differ most between P and U."""
    d = report.controls.distribution_check
    dec = report.decision
    fig, axes = _figure(2.6, ncols=2, width_ratios=[1, 1.3])
    ax = axes[0, 0]
    ax.axvspan(0.0, 0.5, color="#eeeeee", linewidth=0)
    ax.axvspan(dec.auc_threshold, 1.0, color=COLOURS["band"], alpha=0.45, linewidth=0)
    ax.axvline(0.5, color=COLOURS["alpha"], linestyle=":", linewidth=1.0)
    ax.text(0.5, 0.92, "chance", fontsize=7.5, ha="center", transform=ax.get_xaxis_transform())
    ax.text((dec.auc_threshold + 1) / 2, 0.92, "shift if\nsignificant", fontsize=7.5, ha="center",
            va="top", transform=ax.get_xaxis_transform())
    colour = COLOURS["P"] if d.shift else ("#b9770e" if d.warning else COLOURS["U"])
    ax.plot([d.auc], [0.35], "D", color=colour, markersize=9, clip_on=False)
    ha = "right" if d.auc > 0.85 else ("left" if d.auc < 0.15 else "center")
    ax.text(d.auc, 0.12, f"AUC {d.auc:.3f}\np = {d.p_value:.3g}", fontsize=8, ha=ha)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_yticks([])
    ax.spines["left"].set_visible(False)
    ax.set_xlabel("AUC of a classifier of P vs U\nfrom image statistics only", fontsize=8.5)
    bars = axes[0, 1]
    diffs = d.largest_differences
    if diffs:
        names = [s.name for s in diffs][::-1]
        values = [float(np.clip(s.cohens_d, -10, 10)) for s in diffs][::-1]
        bars.barh(names, values, color=[COLOURS["P"] if v > 0 else COLOURS["U"] for v in values])
        bars.axvline(0, color="black", linewidth=0.8)
        bars.set_xlabel("Cohen's d, P minus U", fontsize=8.5)
        bars.tick_params(axis="y", labelsize=7.5)
        bars.set_title("largest differences", fontsize=9)
    else:
        bars.axis("off")
        bars.text(0.5, 0.5, "no image statistic differs\nbetween P and U by |d| ≥ 0.2", ha="center",
                  va="center", fontsize=9)
    return _png(fig)
