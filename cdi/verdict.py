"""The verdict of an audit (method §8), from the test and the controls.

Rules, in this order:

1. ``inconclusive`` if a control fails, whatever the test says:
   - the negative control is significant: its p-value < α (the audit's own α);
   - the direction check fails: P's images look significantly *less* like training data
     than U's (their loss-type features are higher, one-sided p < α). The scorer learns
     whatever separates P from U, so a U that holds training images (or swapped sets)
     would otherwise read as "used";
   - or the distribution check finds a shift: its p-value < ``alpha_control`` (default
     0.01) **and** its AUC ≥ ``auc_threshold`` (default 0.6). The AUC floor keeps a
     difference that only a large sample makes significant, and that a classifier can
     barely use, from blocking a verdict; such a difference is reported as a warning.
   A failed control means the data break the exchangeability of P and U the test relies
   on, so neither a detection nor a non-detection can be trusted.
2. ``used`` if the test's one-sided p-value < α and P scored higher than U.
3. ``not_detected`` otherwise: no evidence of training on P, which is not evidence of the
   contrary.

Both protocols are one-sided, so P scoring lower than U gives p ≥ ½ and can never be
``used``; the rule also checks the sign itself, so that a mistaken p-value cannot either.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cdi.controls import DistributionCheckResult, NegativeControlResult
from cdi.errors import InputError
from cdi.stats import Direction, ProtocolResult

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


def _p(p: float) -> str:
    return f"{p:.3g}"


def decide(
    test: ProtocolResult,
    negative_control: NegativeControlResult | ProtocolResult,
    distribution: DistributionCheckResult,
    *,
    alpha_control: float = DEFAULT_ALPHA_CONTROL,
    auc_threshold: float = DEFAULT_AUC_THRESHOLD,
    reversal_p: float | None = None,
) -> Verdict:
    """The verdict from the audit's test, its negative control and its distribution check.

    α is ``test.alpha``. The negative control must have run the same protocol as the test.
    ``reversal_p`` is the one-sided p-value of "P's loss-type features are higher than U's"
    (see :func:`cdi.controls.direction_check`); ``None`` skips the direction check.
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
    if 1.0 / (1 + distribution.n_permutations) >= alpha_control:
        raise InputError(
            f"the distribution check ran {distribution.n_permutations} permutations, too few "
            f"for its p-value ever to fall below alpha_control = {alpha_control}"
        )
    alpha = test.alpha
    control_failed = control.p_value < alpha
    significant_shift = distribution.p_value < alpha_control
    shift = significant_shift and distribution.auc >= auc_threshold
    warnings: list[str] = []
    if significant_shift and not shift:
        warnings.append(
            f"the image statistics of P and U differ slightly (distribution check AUC "
            f"{distribution.auc:.3f} < {auc_threshold}, p = {_p(distribution.p_value)}): "
            f"{_differences(distribution)}"
        )

    # One clause per fact, so that the sentence reads the same in the JSON, the CLI and the PDF:
    # "crossfit test, one-sided: p = 0.001 < α = 0.01 (Welch t = 3.2)".
    stat_text = f"Welch t = {test.statistic:.3f}"
    test_text = f"{test.protocol.value} test, one-sided: p = {_p(test.p_value)}"
    reversal = reversal_p is not None and reversal_p < alpha
    if control_failed or shift or reversal:
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
        if shift:
            failures.append(
                f"a model-free classifier tells P from U by simple image statistics (AUC "
                f"{distribution.auc:.3f}, p = {_p(distribution.p_value)} < {alpha_control}; "
                f"{_differences(distribution)}), so P and U are not from the same distribution "
                f"and any difference in scores may come from that"
            )
        outcome = Outcome.INCONCLUSIVE
        reason = ("Inconclusive: " + "; and ".join(failures)
                  + f". (For the record, the {test_text}, {stat_text}.)")
    elif test.p_value < alpha and test.statistic > 0:
        outcome = Outcome.USED
        reason = (
            f"Used: P's images score higher than U's beyond chance ({test_text} < α = {alpha}; "
            f"{stat_text}, AUC {test.auc:.3f}, Cohen's d {test.cohens_d:.2f}); the negative control "
            f"(p = {_p(control.p_value)}) and the distribution check (AUC {distribution.auc:.3f}, "
            f"p = {_p(distribution.p_value)}) pass."
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
        p_value=test.p_value,
        alpha=alpha,
        statistic=test.statistic,
        direction=test.direction,
        negative_control_p=control.p_value,
        negative_control_failed=control_failed,
        reversal_p=reversal_p,
        reversal_failed=reversal,
        distribution_auc=distribution.auc,
        distribution_p=distribution.p_value,
        distribution_shift=shift,
        alpha_control=alpha_control,
        auc_threshold=auc_threshold,
        warnings=tuple(warnings),
    )


def _differences(distribution: DistributionCheckResult) -> str:
    if not distribution.largest_differences:
        return "no single statistic stands out"
    parts = [f"{d.name} (d = {d.cohens_d:+.2f})" for d in distribution.largest_differences[:3]]
    return "largest differences, P minus U: " + ", ".join(parts)
