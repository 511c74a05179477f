"""The verdict of an audit (method §8), from the test and the controls.

Rules, in this order:

1. ``inconclusive`` if a control fails, whatever the test says:
   - the negative control is significant: its p-value < α (the audit's own α);
   - the direction check fails: P's images look significantly *less* like training data
     than U's (their loss-type features are higher, one-sided p < α). The scorer learns
     whatever separates P from U, so a U that holds training images (or swapped sets)
     would otherwise read as "used".
   A failed control means the data break the exchangeability of P and U the test relies
   on, so neither a detection nor a non-detection can be trusted.
2. ``inconclusive`` if the test fires (one-sided p < α, P scoring higher) but the way P and
   U differ could be why:
   - the shift control (:mod:`cdi.calibration`) finds that the images' model-free
     descriptors predict P to look more like training data than U (one-sided p <
     ``shift.alpha_shift``, default 0.01): darker, flatter or simpler images have lower
     losses whatever the model saw;
   - or the distribution check finds a shift: its p-value < ``alpha_control`` (default
     0.01) **and** its AUC ≥ ``auc_threshold`` (default 0.6).
   Where the test does not fire, neither changes the outcome (a colour cast that cannot
   make P look used must not block a verdict): they are reported as warnings.
3. ``used`` if the test's one-sided p-value < α and P scored higher than U, **and** the
   difficulty-calibrated test (the same test on what the descriptors cannot explain) gives
   p < α as well: an intersection–union test, valid whenever either test is. Its p-value is
   the larger of the two.
4. ``not_detected`` otherwise: no evidence of training on P, which is not evidence of the
   contrary.

Both protocols are one-sided, so P scoring lower than U gives p ≥ ½ and can never be
``used``; the rule also checks the sign itself, so that a mistaken p-value cannot either.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from cdi.controls import DistributionCheckResult, NegativeControlResult
from cdi.errors import InputError
from cdi.stats import Direction, ProtocolResult

if TYPE_CHECKING:
    from cdi.calibration import ShiftCheckResult

__all__ = [
    "DEFAULT_ALPHA_CONTROL",
    "DEFAULT_AUC_THRESHOLD",
    "Outcome",
    "Verdict",
    "decide",
]

#: Significance level of the distribution check.
DEFAULT_ALPHA_CONTROL = 0.01
#: Smallest distribution-check AUC that makes a significant shift fail the check.
DEFAULT_AUC_THRESHOLD = 0.6


class Outcome(str, Enum):
    USED = "used"
    NOT_DETECTED = "not_detected"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """The audit's outcome with the numbers it rests on and a sentence saying why.

    ``warnings`` name findings that do not change the outcome (a significant but small
    distribution difference).
    """

    outcome: Outcome
    reason: str
    p_value: float
    alpha: float
    statistic: float
    direction: Direction
    negative_control_p: float
    negative_control_failed: bool
    reversal_p: float | None
    reversal_failed: bool
    distribution_auc: float
    distribution_p: float
    distribution_shift: bool
    alpha_control: float
    auc_threshold: float
    warnings: tuple[str, ...]
    #: The difficulty-calibrated test's p-value (``None``: not run, e.g. another protocol).
    calibrated_p: float | None = None
    #: The raw test's own p-value (``p_value`` is the larger of it and ``calibrated_p``).
    test_p: float | None = None
    #: The shift control: its p-value, whether it made the audit inconclusive, and how P
    #: and U differ in words, with the fix (``None`` where it did not run).
    shift_p: float | None = None
    shift_failed: bool = False
    shift_words: str | None = None
    fix: str | None = None


def _p(p: float) -> str:
    return f"{p:.3g}"


def decide(
    test: ProtocolResult,
    negative_control: NegativeControlResult | ProtocolResult,
    distribution: DistributionCheckResult | None,
    *,
    alpha_control: float = DEFAULT_ALPHA_CONTROL,
    auc_threshold: float = DEFAULT_AUC_THRESHOLD,
    reversal_p: float | None = None,
    calibrated: ProtocolResult | None = None,
    shift: ShiftCheckResult | None = None,
) -> Verdict:
    """The verdict from the audit's test, its negative control and its distribution check.

    α is ``test.alpha``. The negative control must have run the same protocol as the test.
    ``reversal_p`` is the one-sided p-value of "P's loss-type features are higher than U's"
    (see :func:`cdi.controls.direction_check`); ``None`` skips the direction check.
    ``calibrated`` is the difficulty-calibrated test (:func:`cdi.assess.calibrated_test`) and
    ``shift`` the shift control (:func:`cdi.calibration.shift_check`); ``None`` skips each.
    ``distribution`` ``None``: the distribution check did not run (it only ever vetoes a
    detection, so its absence changes nothing but a ``used``).
    """
    control, distribution = _checked_inputs(test, negative_control, distribution, alpha_control, auc_threshold)
    alpha = test.alpha
    f = _Findings(
        test=test, control=control, distribution=distribution, alpha_control=alpha_control,
        auc_threshold=auc_threshold, shift=shift,
        control_failed=control.p_value < alpha,
        fires=test.p_value < alpha and test.statistic > 0,
        reversal=reversal_p is not None and reversal_p < alpha,
        reversal_p=reversal_p,
        calibrated_p=calibrated.p_value if calibrated is not None else None,
        confirmed=calibrated is None or (calibrated.p_value < alpha and calibrated.statistic > 0),
    )
    if f.control_failed or f.dist_veto or f.reversal or f.shift_veto:
        outcome, reason = Outcome.INCONCLUSIVE, _inconclusive_reason(f)
    elif f.fires and f.confirmed:
        outcome, reason = Outcome.USED, _used_reason(f)
    else:
        outcome, reason = Outcome.NOT_DETECTED, _not_detected_reason(f)
    return Verdict(
        outcome=outcome,
        reason=reason,
        p_value=max(test.p_value, f.calibrated_p) if f.calibrated_p is not None else test.p_value,
        alpha=alpha,
        statistic=test.statistic,
        direction=test.direction,
        negative_control_p=control.p_value,
        negative_control_failed=f.control_failed,
        reversal_p=reversal_p,
        reversal_failed=f.reversal,
        distribution_auc=distribution.auc,
        distribution_p=distribution.p_value,
        distribution_shift=f.dist_veto,
        alpha_control=alpha_control,
        auc_threshold=auc_threshold,
        warnings=_warnings(f),
        calibrated_p=f.calibrated_p,
        test_p=test.p_value,
        shift_p=shift.p_value if shift is not None else None,
        shift_failed=f.shift_veto,
        shift_words=shift.words() if shift is not None else None,
        fix=_fix(shift) if shift is not None else None,
    )


def _checked_inputs(
    test: ProtocolResult, negative_control: NegativeControlResult | ProtocolResult,
    distribution: DistributionCheckResult | None, alpha_control: float, auc_threshold: float,
) -> tuple[ProtocolResult, DistributionCheckResult]:
    """The negative control's test and the distribution check (:data:`_NOT_RUN` where it did
    not run), after checking that the levels are valid and the control ran the test's protocol."""
    if not 0.0 < alpha_control < 1.0:
        raise InputError(f"alpha_control must lie strictly between 0 and 1, got {alpha_control}")
    if not 0.5 <= auc_threshold <= 1.0:
        raise InputError(f"auc_threshold must lie in [0.5, 1], got {auc_threshold}")
    control = negative_control.test if isinstance(negative_control, NegativeControlResult) else negative_control
    if control.protocol != test.protocol:
        raise InputError(
            f"the negative control ran the {control.protocol.value} protocol but the test ran "
            f"{test.protocol.value}: they must be the same"
        )
    if distribution is None:
        # Not run: it can only veto a detection, so a caller that runs it whenever the verdict
        # would be "used" (cdi.assess.assess(distribution=False) does) gets the same outcome.
        return control, _NOT_RUN
    if 1.0 / (1 + distribution.n_permutations) >= alpha_control:
        raise InputError(
            f"the distribution check ran {distribution.n_permutations} permutations, too few "
            f"for its p-value ever to fall below alpha_control = {alpha_control}"
        )
    return control, distribution


@dataclass(frozen=True)
class _Findings:
    """What :func:`decide` found, from which the outcome and its sentences follow."""

    test: ProtocolResult
    control: ProtocolResult
    distribution: DistributionCheckResult
    alpha_control: float
    auc_threshold: float
    shift: ShiftCheckResult | None
    control_failed: bool
    #: The test's p-value is below α, in the member direction.
    fires: bool
    reversal: bool
    reversal_p: float | None
    calibrated_p: float | None
    #: The calibrated test agrees (or there is none).
    confirmed: bool

    @property
    def significant_shift(self) -> bool:
        return self.distribution.p_value < self.alpha_control

    @property
    def classified(self) -> bool:
        return self.significant_shift and self.distribution.auc >= self.auc_threshold

    @property
    def dist_veto(self) -> bool:
        # The image statistics and the descriptors veto only a detection: a difference that
        # cannot make P look used must not block a verdict (it stays a warning).
        return self.classified and self.fires

    @property
    def shift_veto(self) -> bool:
        return self.shift is not None and self.shift.shifted and self.fires

    @property
    def test_text(self) -> str:
        # One clause per fact, so that the sentence reads the same in the JSON, the CLI and the
        # PDF: "crossfit test, one-sided: p = 0.001 < α = 0.01 (Welch t = 3.2)".
        return f"{self.test.protocol.value} test, one-sided: p = {_p(self.test.p_value)}"

    @property
    def stat_text(self) -> str:
        return f"Welch t = {self.test.statistic:.3f}"


def _warnings(f: _Findings) -> tuple[str, ...]:
    """Findings that do not change the outcome: differences the test did not act on."""
    warnings: list[str] = []
    dist = f.distribution
    if f.significant_shift and not f.dist_veto:
        warnings.append(
            f"the image statistics of P and U differ (distribution check AUC "
            f"{dist.auc:.3f}, p = {_p(dist.p_value)}): {_differences(dist)}; "
            f"the test did not fire, so this cannot have made P look used"
            if f.classified else
            f"the image statistics of P and U differ slightly (distribution check AUC "
            f"{dist.auc:.3f} < {f.auc_threshold}, p = {_p(dist.p_value)}): "
            f"{_differences(dist)}"
        )
    if f.shift is not None and f.shift.shifted and not f.fires:
        warnings.append(
            f"P and U differ in a way that predicts lower losses for P ({f.shift.words()}; shift control "
            f"p = {_p(f.shift.p_value)}), but the test did not fire"
        )
    return tuple(warnings)


def _inconclusive_reason(f: _Findings) -> str:
    alpha = f.test.alpha
    failures = []
    if f.reversal:
        failures.append(
            f"P's images look less like training data than U's (their denoising losses are "
            f"higher, p = {_p(f.reversal_p or 0.0)} < α = {alpha}): U may hold training images, or "
            f"the two sets may have been swapped"
        )
    if f.control_failed:
        failures.append(
            f"the negative control (two random halves of U) is significant (p = "
            f"{_p(f.control.p_value)} < α = {alpha}), so the test's p-values cannot be trusted on "
            f"these data"
        )
    if f.shift_veto and f.shift is not None:
        failures.append(
            f"P and U differ in a way that by itself predicts lower losses for P ({f.shift.words()}; "
            f"shift control p = {_p(f.shift.p_value)} < {f.shift.alpha_shift}), so the test "
            f"firing may come from that rather than from training. {_fix(f.shift)}"
        )
    if f.dist_veto:
        dist = f.distribution
        failures.append(
            f"a model-free classifier tells P from U by simple image statistics (AUC "
            f"{dist.auc:.3f}, p = {_p(dist.p_value)} < {f.alpha_control}; "
            f"{_differences(dist)}), so P and U are not from the same distribution "
            f"and the test firing may come from that"
        )
    cal_text = f"; difficulty-calibrated test p = {_p(f.calibrated_p)}" if f.calibrated_p is not None else ""
    return ("Inconclusive: " + "; and ".join(failures)
            + f". (For the record, the {f.test_text}, {f.stat_text}{cal_text}.)")


def _used_reason(f: _Findings) -> str:
    cal_clause = (f" and so does the difficulty-calibrated test, which discounts what brightness, "
                  f"contrast, detail and colour predict of the losses (p = {_p(f.calibrated_p)})"
                  if f.calibrated_p is not None else "")
    test, dist = f.test, f.distribution
    return (
        f"Used: P's images score higher than U's beyond chance ({f.test_text} < α = {test.alpha}; "
        f"{f.stat_text}, AUC {test.auc:.3f}, Cohen's d {test.cohens_d:.2f}){cal_clause}; the negative "
        f"control (p = {_p(f.control.p_value)}) and the distribution check (AUC {dist.auc:.3f}, "
        f"p = {_p(dist.p_value)}) pass."
    )


def _not_detected_reason(f: _Findings) -> str:
    alpha = f.test.alpha
    if f.fires:
        return (
            f"Not detected: P's images score higher than U's ({f.test_text} < α = {alpha}), but not once "
            f"what brightness, contrast, detail and colour predict of the losses is discounted "
            f"(difficulty-calibrated test p = {_p(f.calibrated_p or 1.0)} ≥ α), so the difference may "
            f"come from the kind of images in P rather than from training. This is not evidence that "
            f"the model was not trained on P."
        )
    return (
        f"Not detected: no evidence that the model was trained on P ({f.test_text} ≥ α = {alpha}; "
        f"{f.stat_text})"
        if f.test.p_value >= alpha
        else f"Not detected: P did not score higher than U ({f.test_text}, {f.stat_text})"
    ) + ". This is not evidence that it was not."


#: A distribution check that found nothing (p = 1), standing in where it was not run.
_NOT_RUN = DistributionCheckResult(0.5, 1.0, 0, 0, 0, 0, 0, (), ())


def _fix(shift: ShiftCheckResult) -> str:
    """What would make P and U comparable, in a photographer's words."""
    return (
        f"{shift.words(1)[0].upper()}{shift.words(1)[1:]}: choose U from the same shoots, period, subjects "
        "and editing as P (unpublished frames from the same sessions are best), so that the two sets "
        "differ only in whether they were published; or give a reference model."
    )


def _differences(distribution: DistributionCheckResult) -> str:
    if not distribution.largest_differences:
        return "no single statistic stands out"
    parts = [f"{d.name} (d = {d.cohens_d:+.2f})" for d in distribution.largest_differences[:3]]
    return "largest differences, P minus U: " + ", ".join(parts)
