"""Recomputing a report's test from the report alone (``cdi recompute``).

Three independent checks, each exact (``==`` on doubles, not a tolerance):

1. **From the scores.** The statistic is rebuilt from the per-image scores of the ``test``
   rows: Welch's t (P minus U), and for the reference protocol its degrees of freedom and
   one-sided p-value. The effect sizes (AUC, Cohen's d, mean scores) too. This needs only
   arithmetic, so a third party can do it with any statistics package.
2. **From the features.** The whole protocol is rerun on the report's features with the
   recorded options and seeds: every score, fold, the statistic and the p-value must come
   out the same. For the cross-fitted protocol this is how the permutation p-value is
   confirmed (it needs the features, which the report holds).
3. **The negative control** likewise, on U's features with its recorded seed; **the
   direction check** on the loss-type features; and **the verdict** from the recomputed test
   and controls and the recorded distribution check (which needs the images themselves, so it
   is taken from the report).

Bit-for-bit equality holds with the library versions the report names; other versions of
numpy, scipy or scikit-learn can change the last digits, which the result notes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cdi.planning import Plan, plan_audit
from cdi.report.errors import ReportFormatError
from cdi.report.model import ImageRow, ProtocolRun, Report, parse_report

__all__ = ["Check", "Recomputation", "plan_from_report", "recompute_document", "recompute_report"]


@dataclass(frozen=True)
class Check:
    """One recomputed quantity: what the report says, what came out, whether they are equal."""

    group: str
    name: str
    recorded: Any
    recomputed: Any

    @property
    def ok(self) -> bool:
        return _same(self.recorded, self.recomputed)


@dataclass
class Recomputation:
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def recompute_document(document: Mapping[str, Any]) -> Recomputation:
    """:func:`recompute_report` on JSON data (validated first)."""
    return recompute_report(parse_report(document))


def _scored_rows(rows: list[ImageRow]) -> list[Any]:
    from cdi.stats import ScoredImage

    return [ScoredImage(r.set, r.index, r.role, r.fold, r.score) for r in rows]


def _protocol_checks(group: str, recorded: ProtocolRun, result: Any) -> list[Check]:
    names = ("statistic", "df", "p_value", "direction", "auc", "cohens_d", "mean_score_p", "mean_score_u",
             "n_fit_p", "n_fit_u", "n_test_p", "n_test_u", "random_state", "n_permutations", "exceedances")
    out = []
    for name in names:
        value = getattr(result, name)
        out.append(Check(group, name, getattr(recorded, name), float(value) if isinstance(value, float) else value))
    return out


def recompute_report(report: Report) -> Recomputation:
    """Recompute ``report``'s test, negative control and verdict (see the module docstring)."""
    from cdi.controls import DistributionCheckResult, StatisticDifference, direction_check, negative_control
    from cdi.stats import recompute, run_test
    from cdi.verdict import decide

    out = Recomputation()
    test = report.test
    opts = report.manifest.options
    options = opts.protocol_options(report.feature_layout.used)

    # 1. From the scores alone.
    out.checks += _score_checks(report)

    # 2. The protocol rerun on the features (a sequential audit: every look it took).
    xp, xu = report.used_features()
    if report.sequential is not None:
        rerun = _sequential_checks(report, xp, xu, options, out)
        options = _control_options(options)
    else:
        rerun = run_test(xp, xu, test.protocol, options, alpha=test.alpha, random_state=test.random_state)
    out.checks += _protocol_checks("features", test, rerun)
    rerun_rows = {(r.set_name, r.index): r for r in rerun.rows}
    mismatched = [r.name for r in report.images
                  if (rr := rerun_rows.get((r.set, r.index))) is None
                  or (rr.role, rr.fold, rr.score) != (r.role, r.fold, r.score)]
    out.checks.append(Check("features", "per-image roles, folds and scores",
                            f"{len(report.images)} rows", f"{len(report.images) - len(mismatched)} rows equal"
                            if mismatched else f"{len(report.images)} rows"))
    if mismatched:
        out.notes.append(f"{len(mismatched)} image(s) scored differently, e.g. {mismatched[0]}")

    # 3. The negative control, from its scores and rerun on U's features.
    nc = report.controls.negative_control
    control_rows = _control_rows(nc)
    rebuilt_nc = recompute(control_rows, nc.test.protocol)
    out.checks.append(Check("negative control", "statistic (from scores)", nc.test.statistic, rebuilt_nc.statistic))
    if nc.test.protocol == "reference":
        out.checks.append(Check("negative control", "p_value (from scores)", nc.test.p_value, rebuilt_nc.p_value))
    control = negative_control(xu, test.protocol, options, alpha=test.alpha, random_state=nc.split_random_state)
    out.checks += [
        Check("negative control", "halves", (nc.half_p, nc.half_u), (list(control.half_p), list(control.half_u))),
        Check("negative control", "statistic (rerun)", nc.test.statistic, float(control.test.statistic)),
        Check("negative control", "p_value (rerun)", nc.p_value, float(control.p_value)),
    ]

    # 4. The direction check, on all the features.
    fp, fu = report.all_features()
    recorded_reversal = report.controls.direction_check.p_value
    reversal = direction_check(fp, fu) if recorded_reversal is not None else None
    out.checks.append(Check("direction check", "p_value", recorded_reversal, reversal))

    # 5. The verdict.
    d = report.controls.distribution_check
    dist = DistributionCheckResult(
        auc=d.auc, p_value=d.p_value, n_p=d.n_p, n_u=d.n_u, n_folds=d.n_folds, n_permutations=d.n_permutations,
        random_state=d.random_state, statistic_names=tuple(d.statistic_names),
        largest_differences=tuple(StatisticDifference(s.name, s.cohens_d, s.auc) for s in d.largest_differences),
    )
    calibrated, shift = _calibration_checks(report, xp, xu, options, out)
    verdict = decide(rerun, control, dist, alpha_control=report.decision.alpha_control,
                     auc_threshold=report.decision.auc_threshold, reversal_p=reversal,
                     calibrated=calibrated, shift=shift)
    out.checks += [
        Check("verdict", "p_value", report.p_value, float(verdict.p_value)),
        Check("verdict", "verdict", report.verdict, verdict.outcome.value),
    ]
    out.notes.append("the distribution check needs the images themselves: its AUC and p-value are taken "
                     "from the report")
    out.notes += _version_notes(report)
    return out


def _score_checks(report: Report) -> list[Check]:
    """The test's statistic and effect sizes rebuilt from the per-image scores alone."""
    from cdi.stats import auc, cohens_d, recompute

    test = report.test
    rebuilt = recompute(_scored_rows(report.images), test.protocol)
    checks = [Check("scores", "statistic", test.statistic, rebuilt.statistic)]
    if test.protocol == "reference":
        checks.append(Check("scores", "df", test.df, rebuilt.df))
        checks.append(Check("scores", "p_value", test.p_value, rebuilt.p_value))
    sp = np.array([r.score for r in report.rows("P") if r.role == "test"], dtype=np.float64)
    su = np.array([r.score for r in report.rows("U") if r.role == "test"], dtype=np.float64)
    return [
        *checks,
        Check("scores", "auc", test.auc, auc(sp, su)),
        Check("scores", "cohens_d", test.cohens_d, cohens_d(sp, su)),
        Check("scores", "mean_score_p", test.mean_score_p, float(sp.mean())),
        Check("scores", "mean_score_u", test.mean_score_u, float(su.mean())),
    ]


def _version_notes(report: Report) -> list[str]:
    """A note if the libraries that compute the numbers differ from the report's."""
    from cdi.provenance import versions

    current = versions()
    differing = [f"{pkg} {report.manifest.versions.get(pkg)} → {current.get(pkg)}"
                 for pkg in ("numpy", "scipy", "scikit-learn", "cdi-audit")
                 if report.manifest.versions.get(pkg) != current.get(pkg)]
    if not differing:
        return []
    return ["recomputed with other library versions than the report's (" + ", ".join(differing)
            + "): the last digits of some numbers may differ"]


def _calibration_checks(report: Report, xp: np.ndarray, xu: np.ndarray, options: Any,
                        out: Recomputation) -> tuple[Any, Any]:
    """Rerun the difficulty-calibrated test and the shift control from the features and descriptors."""
    from cdi.assess import calibrated_test, member_likeness
    from cdi.calibration import shift_check

    recorded_cal, recorded_shift = report.calibrated_test, report.controls.shift_control
    if recorded_cal is None and recorded_shift is None:
        return None, None
    rows = report.rows("P") + report.rows("U")
    if any(r.descriptors is None for r in rows):
        raise ReportFormatError("the report has a calibrated test or a shift control but an image lacks its "
                                "descriptors")
    d = np.array([r.descriptors for r in rows], dtype=np.float64)
    dp, du = d[: len(xp)], d[len(xp):]
    calibrated = shift = None
    if recorded_cal is not None:
        # A sequential audit's stopping look: its share of alpha (cdi.assess.assess).
        weight = 1.0 if report.sequential is None else report.sequential.looks[-1].level / report.alpha
        calibrated = calibrated_test(xp, xu, dp, du, options, alpha=recorded_cal.alpha,
                                     random_state=recorded_cal.random_state, level=recorded_cal.alpha * weight)
        if weight != 1.0:
            calibrated = replace(calibrated, p_value=min(1.0, calibrated.p_value / weight))
        out.checks += _protocol_checks("calibrated test", recorded_cal, calibrated)
    if recorded_shift is not None:
        likeness = member_likeness(np.vstack([xp, xu]), options)
        shift = shift_check(likeness, d, len(xp), alpha_shift=recorded_shift.alpha_shift, ridge=recorded_shift.ridge,
                            random_state=recorded_shift.random_state)
        if recorded_shift.class_p is not None:  # the classes are not in the report
            shift = replace(shift, class_p=recorded_shift.class_p, class_words=recorded_shift.class_words)
            out.notes.append("the shift control's class check needs the images' classes: its p-value is taken "
                             "from the report")
        out.checks += [Check("shift control", "statistic", recorded_shift.statistic, float(shift.statistic)),
                       Check("shift control", "p_value", recorded_shift.p_value, float(shift.p_value))]
    return calibrated, shift


def _control_options(options: Any) -> Any:
    from cdi.sequential import control_options

    return control_options(options)


def _sequential_checks(report: Report, xp: np.ndarray, xu: np.ndarray, options: Any, out: Recomputation) -> Any:
    """Rerun a sequential audit's looks on the report's features; returns the stopping test.

    The design follows from the submitted set sizes and the options. A crossing look's
    controls decided whether it stopped the audit: the last look's are recomputed below;
    an earlier crossing look's outcome (it did not stop) is taken from the report.
    """
    from cdi.options import SequentialOptions, Spending
    from cdi.sequential import design, sequential_test

    seq = report.sequential
    assert seq is not None
    opts = report.manifest.options
    plan = design(seq.submitted_p, seq.submitted_u,
                  SequentialOptions(True, opts.looks, Spending(opts.spending), opts.futility), report.alpha,
                  floor=1.0 / (1 + opts.max_permutations))
    out.checks.append(Check("sequential", "planned looks [n_p, n_u]", seq.planned,
                            [[lk.n_p, lk.n_u] for lk in plan.looks]))
    recorded = seq.looks
    result = sequential_test(
        xp, xu, plan, options, random_state=report.test.random_state,
        controls=lambda k, _test: bool(recorded[k].controls_passed) if k < len(recorded) else True)
    out.checks.append(Check("sequential", "looks taken", len(recorded), len(result.looks)))
    for k, (rec, look) in enumerate(zip(recorded, result.looks, strict=False)):
        out.checks += [
            Check("sequential", f"look {k + 1} level", rec.level, float(look.look.level)),
            Check("sequential", f"look {k + 1} statistic", rec.test.statistic, float(look.test.statistic)),
            Check("sequential", f"look {k + 1} p_value", rec.test.p_value, float(look.test.p_value)),
            Check("sequential", f"look {k + 1} crossed", rec.crossed, look.crossed),
        ]
    out.checks += [Check("sequential", "stop", seq.stop, result.stop),
                   Check("sequential", "p_value", seq.p_value, float(result.p_value))]
    if len(recorded) > 1 and any(r.crossed for r in recorded[:-1]):
        out.notes.append("an earlier look crossed but its controls failed: that outcome is taken from the report")
    return result.test


def _control_rows(nc: Any) -> list[Any]:
    from cdi.stats import ScoredImage

    positions = {"P": {u: i for i, u in enumerate(nc.half_p)}, "U": {u: i for i, u in enumerate(nc.half_u)}}
    rows = []
    for r in nc.rows:
        index = positions[r.plays].get(r.u_index)
        if index is None:
            raise ReportFormatError(f"negative control row U[{r.u_index}] is not in the half it claims")
        rows.append(ScoredImage(r.plays, index, r.role, r.fold, r.score))
    return rows


def plan_from_report(document: Report | Mapping[str, Any], **options: Any) -> Plan:
    """:func:`cdi.planning.plan_audit` with an earlier report's images as the pilot (any verdict).

    ``document``: a parsed :class:`~cdi.report.model.Report` or its JSON data; ``options``
    are :func:`~cdi.planning.plan_audit`'s keyword arguments.
    """
    from cdi.features.layout import FEATURE_NAMES

    report = document if isinstance(document, Report) else parse_report(document)
    xp, xu = report.used_features()
    columns = [FEATURE_NAMES.index(n) for n in report.feature_layout.used]
    return plan_audit(xp, xu, columns, **options)
