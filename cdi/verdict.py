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
        distribution = _NOT_RUN
    elif 1.0 / (1 + distribution.n_permutations) >= alpha_control:
        raise InputError(
            f"the distribution check ran {distribution.n_permutations} permutations, too few "
            f"for its p-value ever to fall below alpha_control = {alpha_control}"
        )
    shift_check = shift
    del shift
    alpha = test.alpha
    control_failed = control.p_value < alpha
    fires = test.p_value < alpha and test.statistic > 0
    significant_shift = distribution.p_value < alpha_control
    classified = significant_shift and distribution.auc >= auc_threshold
    # The image statistics and the descriptors veto only a detection: a difference that
    # cannot make P look used must not block a verdict (it stays a warning).
    dist_veto = classified and fires
    shift_result: ShiftCheckResult | None = None
    shift_veto = False
    warnings: list[str] = []
    if significant_shift and not dist_veto:
        warnings.append(
            f"the image statistics of P and U differ (distribution check AUC "
            f"{distribution.auc:.3f}, p = {_p(distribution.p_value)}): {_differences(distribution)}; "
            f"the test did not fire, so this cannot have made P look used"
            if classified else
            f"the image statistics of P and U differ slightly (distribution check AUC "
            f"{distribution.auc:.3f} < {auc_threshold}, p = {_p(distribution.p_value)}): "
            f"{_differences(distribution)}"
        )
    shift_words = fix = None
    if shift_check is not None:
        shift_result = shift_check
        shift_words = shift_check.words()
        fix = _fix(shift_check)
        shift_veto = shift_check.shifted and fires
        if shift_check.shifted and not fires:
            warnings.append(
                f"P and U differ in a way that predicts lower losses for P ({shift_words}; shift control "
                f"p = {_p(shift_check.p_value)}), but the test did not fire"
            )
    calibrated_p = calibrated.p_value if calibrated is not None else None
    confirmed = calibrated is None or (calibrated.p_value < alpha and calibrated.statistic > 0)
    reported_p = max(test.p_value, calibrated_p) if calibrated_p is not None else test.p_value

    # One clause per fact, so that the sentence reads the same in the JSON, the CLI and the PDF:
    # "crossfit test, one-sided: p = 0.001 < α = 0.01 (Welch t = 3.2)".
    stat_text = f"Welch t = {test.statistic:.3f}"
    test_text = f"{test.protocol.value} test, one-sided: p = {_p(test.p_value)}"
    cal_text = f"; difficulty-calibrated test p = {_p(calibrated_p)}" if calibrated_p is not None else ""
    reversal = reversal_p is not None and reversal_p < alpha
    if control_failed or dist_veto or reversal or shift_veto:
        failures = []
        if reversal:
            failures.append(
                f"P's images look less like training data than U's (their denoising losses are "
                f"higher, p = {_p(reversal_p or 0.0)} < α = {alpha}): U may hold training images, or "
                f"the two sets may have been swapped"
            )
        if control_failed:
            failures.append(
                f"the negative control (two random halves of U) is significant (p = "
                f"{_p(control.p_value)} < α = {alpha}), so the test's p-values cannot be trusted on "
                f"these data"
            )
        if shift_veto and shift_check is not None:
            failures.append(
                f"P and U differ in a way that by itself predicts lower losses for P ({shift_words}; "
                f"shift control p = {_p(shift_check.p_value)} < {shift_check.alpha_shift}), so the test "
                f"firing may come from that rather than from training. {fix}"
            )
        if dist_veto:
            failures.append(
                f"a model-free classifier tells P from U by simple image statistics (AUC "
                f"{distribution.auc:.3f}, p = {_p(distribution.p_value)} < {alpha_control}; "
                f"{_differences(distribution)}), so P and U are not from the same distribution "
                f"and the test firing may come from that"
            )
        outcome = Outcome.INCONCLUSIVE
        reason = ("Inconclusive: " + "; and ".join(failures)
                  + f". (For the record, the {test_text}, {stat_text}{cal_text}.)")
    elif fires and confirmed:
        outcome = Outcome.USED
        cal_clause = (f" and so does the difficulty-calibrated test, which discounts what brightness, "
                      f"contrast, detail and colour predict of the losses (p = {_p(calibrated_p)})"
                      if calibrated_p is not None else "")
        reason = (
            f"Used: P's images score higher than U's beyond chance ({test_text} < α = {alpha}; "
            f"{stat_text}, AUC {test.auc:.3f}, Cohen's d {test.cohens_d:.2f}){cal_clause}; the negative "
            f"control (p = {_p(control.p_value)}) and the distribution check (AUC {distribution.auc:.3f}, "
            f"p = {_p(distribution.p_value)}) pass."
        )
    elif fires:
        outcome = Outcome.NOT_DETECTED
        reason = (
            f"Not detected: P's images score higher than U's ({test_text} < α = {alpha}), but not once "
            f"what brightness, contrast, detail and colour predict of the losses is discounted "
            f"(difficulty-calibrated test p = {_p(calibrated_p or 1.0)} ≥ α), so the difference may "
            f"come from the kind of images in P rather than from training. This is not evidence that "
            f"the model was not trained on P."
        )
    else:
        outcome = Outcome.NOT_DETECTED
        reason = (
            f"Not detected: no evidence that the model was trained on P ({test_text} ≥ α = {alpha}; "
            f"{stat_text})"
            if test.p_value >= alpha
            else f"Not detected: P did not score higher than U ({test_text}, {stat_text})"
        ) + ". This is not evidence that it was not."
    return Verdict(
        outcome=outcome,
        reason=reason,
        p_value=reported_p,
        alpha=alpha,
        statistic=test.statistic,
        direction=test.direction,
        negative_control_p=control.p_value,
        negative_control_failed=control_failed,
        reversal_p=reversal_p,
        reversal_failed=reversal,
        distribution_auc=distribution.auc,
        distribution_p=distribution.p_value,
        distribution_shift=dist_veto,
        alpha_control=alpha_control,
        auc_threshold=auc_threshold,
        warnings=tuple(warnings),
        calibrated_p=calibrated_p,
        test_p=test.p_value,
        shift_p=shift_result.p_value if shift_result is not None else None,
        shift_failed=bool(shift_veto),
        shift_words=shift_words,
        fix=fix,
    )


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
