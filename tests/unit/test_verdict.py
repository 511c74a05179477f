"""The verdict (cdi.verdict): used / not detected / inconclusive, and the direction guard."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from cdi import controls, stats, verdict
from cdi.controls import DistributionCheckResult, NegativeControlResult
from cdi.errors import InputError
from cdi.options import Protocol, ProtocolOptions
from cdi.stats import ProtocolResult
from cdi.verdict import Outcome

FAST = ProtocolOptions(n_permutations=199, max_permutations=20_000)


def audit(shift: float, protocol: Protocol, seed: int = 0) -> tuple[ProtocolResult, NegativeControlResult]:
    rng = np.random.default_rng(seed)
    xp = rng.normal(size=(100, 26))
    xu = rng.normal(size=(100, 26))
    xp[:, :5] -= shift  # training images have lower losses
    test = stats.run_test(xp, xu, protocol, FAST, random_state=seed)
    control = controls.negative_control(xu, protocol, FAST, random_state=seed + 1)
    return test, control


def clean_distribution(seed: int = 0) -> DistributionCheckResult:
    rng = np.random.default_rng(seed)
    return controls.distribution_check(
        rng.normal(size=(50, 4)), rng.normal(size=(50, 4)), seed, n_permutations=199,
        statistic_names=("a", "b", "c", "d"),
    )


@pytest.fixture(scope="module")
def passing_distribution() -> DistributionCheckResult:
    res = clean_distribution()
    assert res.p_value >= verdict.DEFAULT_ALPHA_CONTROL
    return res


@pytest.mark.parametrize("protocol", list(Protocol))
def test_shifted_features_are_used(protocol: Protocol, passing_distribution: DistributionCheckResult) -> None:
    test, control = audit(0.5, protocol)
    v = verdict.decide(test, control, passing_distribution)
    assert v.outcome is Outcome.USED, v.reason
    assert v.reason.startswith("Used") and f"{test.p_value:.3g}" in v.reason
    assert not v.negative_control_failed and not v.distribution_shift and v.warnings == ()


@pytest.mark.parametrize("protocol", list(Protocol))
def test_null_features_are_not_detected(protocol: Protocol, passing_distribution: DistributionCheckResult) -> None:
    test, control = audit(0.0, protocol, seed=3)
    v = verdict.decide(test, control, passing_distribution)
    assert v.outcome is Outcome.NOT_DETECTED, v.reason
    assert "not evidence that it was not" in v.reason


def test_p_scoring_lower_never_yields_used(passing_distribution: DistributionCheckResult) -> None:
    test, control = audit(0.5, Protocol.REFERENCE)
    # Even a (mistaken) tiny p-value with P scoring lower than U is not "used".
    reversed_test = dataclasses.replace(test, statistic=-abs(test.statistic), direction="P<U", p_value=1e-6)
    v = verdict.decide(reversed_test, control, passing_distribution)
    assert v.outcome is Outcome.NOT_DETECTED and "did not score higher" in v.reason
    # And over null audits of both protocols, a negative statistic is never "used".
    rng = np.random.default_rng(7)
    for protocol in Protocol:
        _, c = audit(0.0, protocol, seed=5)
        for seed in range(12):
            t = stats.run_test(rng.normal(size=(40, 26)), rng.normal(size=(40, 26)), protocol, FAST, random_state=seed)
            v = verdict.decide(t, c, passing_distribution)
            assert (v.outcome is Outcome.USED) <= (t.statistic > 0 and t.p_value < t.alpha)


def test_significant_negative_control_is_inconclusive(passing_distribution: DistributionCheckResult) -> None:
    test, control = audit(0.5, Protocol.REFERENCE)
    failing = dataclasses.replace(control, test=dataclasses.replace(control.test, p_value=0.001))
    v = verdict.decide(test, failing, passing_distribution)
    assert v.outcome is Outcome.INCONCLUSIVE and v.negative_control_failed
    assert "negative control" in v.reason
    # Also when the test itself finds nothing: a broken control makes that untrustworthy too.
    null_test, _ = audit(0.0, Protocol.REFERENCE, seed=3)
    assert verdict.decide(null_test, failing, passing_distribution).outcome is Outcome.INCONCLUSIVE


def test_distribution_shift_is_inconclusive_only_above_the_auc_threshold(
    passing_distribution: DistributionCheckResult,
) -> None:
    test, control = audit(0.5, Protocol.REFERENCE)
    shifted = dataclasses.replace(
        passing_distribution,
        auc=0.93,
        p_value=0.001,
        largest_differences=(controls.StatisticDifference("mean_r", 2.1, 0.93),),
    )
    v = verdict.decide(test, control, shifted)
    assert v.outcome is Outcome.INCONCLUSIVE and v.distribution_shift
    assert "mean_r" in v.reason and "not from the same distribution" in v.reason
    slight = dataclasses.replace(passing_distribution, auc=0.56, p_value=0.004)
    v = verdict.decide(test, control, slight)
    assert v.outcome is Outcome.USED and len(v.warnings) == 1 and "differ slightly" in v.warnings[0]
    # Not significant at alpha_control: no effect, whatever the AUC.
    assert verdict.decide(test, control, dataclasses.replace(shifted, p_value=0.02)).outcome is Outcome.USED
    assert verdict.decide(test, control, shifted, auc_threshold=0.95).outcome is Outcome.USED


def test_decide_validates_its_inputs(passing_distribution: DistributionCheckResult) -> None:
    test, _ = audit(0.5, Protocol.REFERENCE)
    _, crossfit_control = audit(0.5, Protocol.CROSSFIT)
    with pytest.raises(InputError, match="same"):
        verdict.decide(test, crossfit_control, passing_distribution)
    _, control = audit(0.5, Protocol.REFERENCE)
    with pytest.raises(InputError):
        verdict.decide(test, control, passing_distribution, alpha_control=0.0)
    with pytest.raises(InputError):
        verdict.decide(test, control, passing_distribution, auc_threshold=0.4)
    with pytest.raises(InputError, match="too few"):
        verdict.decide(test, control, dataclasses.replace(passing_distribution, n_permutations=50))
    # A plain ProtocolResult is accepted as the negative control.
    assert verdict.decide(test, control.test, passing_distribution).negative_control_p == control.p_value


def test_statistics_modules_never_import_torch() -> None:
    code = (
        "import sys, cdi.scoring, cdi.stats, cdi.controls, cdi.verdict; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'diffusers'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("shift", [0.5, 0.0])
def test_reason_reads_as_a_sentence(shift: float, passing_distribution: DistributionCheckResult) -> None:
    """The p-value sits next to its comparison with α ("p = 0.001 < α = 0.01"), not after a clause."""
    test, control = audit(shift, Protocol.CROSSFIT, seed=3)
    v = verdict.decide(test, control, passing_distribution)
    sign = "<" if v.outcome is Outcome.USED else "≥"
    assert f"crossfit test, one-sided: p = {test.p_value:.3g} {sign} α = {test.alpha}" in v.reason, v.reason
    assert f"Welch t = {test.statistic:.3f}" in v.reason
    assert "than U <" not in v.reason and "than U ≥" not in v.reason
