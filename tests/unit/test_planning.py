"""The audit-size planner (cdi.planning): its power model against the directional test itself."""

from __future__ import annotations

import numpy as np
import pytest

from cdi import stats
from cdi.errors import InputError
from cdi.features.layout import FEATURE_NAMES, FeatureSet, member_candidates
from cdi.options import ProtocolOptions
from cdi.planning import plan_audit, power_at
from cdi.report import plan_from_report, result_to_dict

COLUMNS = FeatureSet.ALL.columns
PIA = FEATURE_NAMES.index("pia")


def losses(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Positive, skewed "losses" with a shared difficulty factor; PIA lowered by ``shift`` (in log units)."""
    x = np.exp(0.3 * rng.normal(size=(n, len(FEATURE_NAMES))) + 0.5 * rng.normal(size=(n, 1)))
    x[:, PIA] *= np.exp(-shift)
    return x


def test_predicted_power_matches_the_test_it_plans_for() -> None:
    rng = np.random.default_rng(0)
    # A large pilot, so that the comparison is of the power model, not of the pilot's noise.
    pilot_p, pilot_u = losses(rng, 3000, shift=0.25), losses(rng, 3000)
    options = ProtocolOptions(candidates=member_candidates(COLUMNS)[1], max_permutations=10_000)
    n = 40
    predicted = power_at(pilot_p, pilot_u, COLUMNS, n, n, alpha=0.05)
    runs = 200
    hits = sum(
        stats.directional_test(losses(rng, n, shift=0.25), losses(rng, n), options, alpha=0.05,
                               random_state=s).significant
        for s in range(runs)
    )
    assert 0.2 < predicted < 0.95  # a size where the answer is not trivial
    # Binomial sampling error of 200 runs is ±0.035 (1 sd); the rest is the model's.
    assert abs(hits / runs - predicted) < 0.1, (hits / runs, predicted)


def test_plan_grows_as_the_effect_shrinks_and_brackets_its_estimate() -> None:
    rng = np.random.default_rng(1)
    strong = plan_audit(losses(rng, 30, shift=0.6), losses(rng, 30), COLUMNS, bootstraps=60)
    weak = plan_audit(losses(rng, 30, shift=0.15), losses(rng, 30), COLUMNS, bootstraps=60)
    assert strong.n_per_set is not None and weak.n_per_set is not None
    assert strong.n_per_set < weak.n_per_set
    lo, hi = weak.interval
    assert lo is not None and lo <= weak.n_per_set and (hi is None or weak.n_per_set <= hi)
    assert strong.effects[0][0] == "pia" and strong.effects[0][1] > 0
    assert "published images" in strong.summary() and strong.additional_p == max(0, strong.n_per_set - 30)


def test_the_plan_never_proposes_fewer_images_than_an_audit_accepts() -> None:
    from cdi.options import minimum_sizes
    from cdi.stats import check_sizes

    rng = np.random.default_rng(4)
    pilot_p, pilot_u = losses(rng, 30, shift=1.5), losses(rng, 30)  # an effect the fewest images show
    sizes = minimum_sizes()
    assert sizes.u > sizes.p  # the negative control splits U in two
    twice = plan_audit(pilot_p, pilot_u, COLUMNS, u_ratio=sizes.u / sizes.p, bootstraps=20)
    same = plan_audit(pilot_p, pilot_u, COLUMNS, u_ratio=1.0, bootstraps=20)
    assert twice.n_per_set == sizes.p and same.n_per_set == sizes.u
    for plan in (twice, same):
        assert plan.n_per_set is not None
        check_sizes(plan.n_per_set, round(plan.n_per_set * plan.u_ratio), "directional")  # accepted


def test_no_effect_is_no_plan() -> None:
    rng = np.random.default_rng(2)
    x = losses(rng, 40)
    plan = plan_audit(x[:20], x[20:], COLUMNS, bootstraps=20)
    # A pilot of exchangeable images: either nothing reachable, or a size far beyond the pilot.
    assert plan.n_per_set is None or plan.n_per_set > 100


def test_bad_pilots_are_refused() -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(InputError, match="at least 3 images"):
        plan_audit(losses(rng, 2), losses(rng, 10), COLUMNS)
    with pytest.raises(InputError, match="26 features"):
        plan_audit(losses(rng, 5)[:, :3], losses(rng, 5)[:, :3], COLUMNS)
    with pytest.raises(InputError, match="alpha"):
        plan_audit(losses(rng, 5), losses(rng, 5), COLUMNS, alpha=0.7)
    bad = losses(rng, 5)
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        plan_audit(bad, losses(rng, 5), COLUMNS)


def test_plan_from_an_earlier_report(tmp_path, capsys) -> None:
    import json

    from test_report import synthetic_result  # type: ignore[import-not-found]

    from cdi.cli import main
    from cdi.report.model import parse_report

    document = result_to_dict(synthetic_result("used", protocol="directional", seed=3))
    plan = plan_from_report(document, power=0.8)
    assert plan.n_pilot_p == 30 and plan.n_pilot_u == 40
    # The report's own images are the pilot: the same plan as from their features directly.
    report = parse_report(document)
    xp, xu = report.used_features()
    columns = [FEATURE_NAMES.index(n) for n in report.feature_layout.used]
    assert plan == plan_audit(xp, xu, columns, power=0.8)
    assert plan.n_per_set is not None and plan.effects
    path = tmp_path / "report.json"
    path.write_text(json.dumps(document))
    assert main(["plan", "--report", str(path), "--power", "0.8"]) == 0
    assert capsys.readouterr().out.strip() == plan.summary()
