"""The statistical test (cdi.scoring, cdi.stats): agreement with scipy / scikit-learn, the
exactness of the permutation test, power on shifted data and false positives on null data."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from cdi import scoring, stats
from cdi.errors import InputError
from cdi.options import (
    DEFAULT_ALPHA,
    DEFAULT_EXCEEDANCES,
    DEFAULT_MAX_PERMUTATIONS,
    DEFAULT_PROTOCOL,
    Protocol,
    ProtocolOptions,
    check_alpha,
    minimum_set_size,
)

K = 26  # features per image, as the layout
#: Every column its own candidate (the default on K columns is the audit's loss-type candidates).
EVERY_COLUMN = ProtocolOptions(candidates=tuple((j,) for j in range(K)))


def gaussian_sets(
    rng: np.random.Generator, n_p: int, n_u: int, shift: float = 0.0, columns: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """P and U with K standard normal features; P's first ``columns`` shifted by ``shift``."""
    xp = rng.normal(size=(n_p, K))
    xu = rng.normal(size=(n_u, K))
    xp[:, :columns] += shift
    return xp, xu


def binomial_bound(n: int, alpha: float, risk: float = 1e-3) -> int:
    """Largest false-positive count a correct test exceeds with probability below ``risk``."""
    k = int(sps.binom.isf(risk, n, alpha))
    while sps.binom.sf(k, n, alpha) >= risk:
        k += 1
    return k


# --- small statistics -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.5], [0.5, 1.0, 1.5, 2.0]),
        ([0.2, 0.1, 0.4, 0.3, 0.25, 0.35, 0.15], [0.3, 0.32, 0.31, 0.5]),
        ([3.0, 1.0, 2.0], [10.0, 11.0, 12.5, 9.0, 8.0]),  # a lower: p near 1
    ],
)
def test_welch_greater_equals_scipy(a: list[float], b: list[float]) -> None:
    ref = sps.ttest_ind(a, b, equal_var=False, alternative="greater")
    res = stats.welch_greater(np.array(a), np.array(b))
    assert res.statistic == float(ref.statistic)
    assert res.df == float(ref.df)
    assert res.p_value == float(ref.pvalue)


def test_welch_greater_rejects_bad_samples() -> None:
    with pytest.raises(InputError):
        stats.welch_greater(np.array([1.0]), np.array([1.0, 2.0]))
    with pytest.raises(InputError):
        stats.welch_greater(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


def test_welch_t_rows_equals_scipy() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 30))
    is_p = np.zeros((20, 30), dtype=bool)
    for r in range(20):
        is_p[r, rng.choice(30, 12, replace=False)] = True
    t = stats.welch_t_rows(scores, is_p)
    for r in range(20):
        ref = sps.ttest_ind(scores[r, is_p[r]], scores[r, ~is_p[r]], equal_var=False).statistic
        assert t[r] == pytest.approx(ref, rel=1e-12)


def test_welch_t_rows_degenerate_groups_are_not_nan() -> None:
    is_p = np.array([[True, True, False, False]] * 3)
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]])
    assert stats.welch_t_rows(scores, is_p).tolist() == [0.0, np.inf, -np.inf]


def test_auc_and_cohens_d() -> None:
    rng = np.random.default_rng(1)
    a = np.round(rng.normal(0.5, 1, 40), 1)  # rounding makes ties
    b = np.round(rng.normal(0.0, 1, 30), 1)
    y = np.r_[np.ones(40), np.zeros(30)]
    assert stats.auc(a, b) == pytest.approx(roc_auc_score(y, np.r_[a, b]), abs=1e-12)
    pooled = np.sqrt((39 * a.var(ddof=1) + 29 * b.var(ddof=1)) / 68)
    assert stats.cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / pooled, rel=1e-12)


def test_cohens_d_of_a_constant_is_zero_or_infinite_not_rounding() -> None:
    # The mean of 7 copies of log(1.2) is not exactly log(1.2): a naive d reads ±1.6.
    x = np.log(24 / 20)
    for n_a, n_b in [(7, 13), (12, 20), (30, 40)]:
        assert stats.cohens_d(np.full(n_a, x), np.full(n_b, x)) == 0.0
    assert stats.cohens_d(np.full(5, 1.0), np.full(6, 2.0)) == -math.inf
    # A real but small spread is kept.
    assert abs(stats.cohens_d(np.array([1.0, 1.0 + 1e-9]), np.array([1.0, 1.0 + 1e-9]) + 1e-9)) > 0.5


def _welch_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(sps.ttest_ind(x, y, equal_var=False, axis=axis).statistic)


def test_permutation_p_value_equals_scipy_randomised() -> None:
    # scipy's randomised permutation test uses the same (1 + count) / (1 + n) rule and the
    # same tie tolerance: fed scipy's null distribution, ours gives scipy's p-value.
    rng = np.random.default_rng(2)
    a = rng.normal(0.4, 1, 15)
    b = rng.normal(0.0, 1, 12)
    res = sps.permutation_test(
        (a, b), _welch_stat, permutation_type="independent", alternative="greater",
        n_resamples=999, vectorized=True, rng=np.random.default_rng(3),
    )
    observed = float(_welch_stat(a, b))
    assert stats.permutation_p_value(observed, res.null_distribution) == pytest.approx(res.pvalue, abs=1e-15)


def test_exact_enumeration_matches_scipy_exact_test() -> None:
    # All 126 splits of 9 scores into 5 + 4: the exact permutation p-value of Welch's t,
    # computed with our vectorised statistic, equals scipy's exact test.
    a = np.array([0.9, 0.7, 0.65, 0.8, 0.55])
    b = np.array([0.5, 0.6, 0.4, 0.62])
    pooled = np.r_[a, b]
    splits = list(itertools.combinations(range(9), 5))
    is_p = np.zeros((len(splits), 9), dtype=bool)
    for r, members in enumerate(splits):
        is_p[r, list(members)] = True
    t = stats.welch_t_rows(np.broadcast_to(pooled, is_p.shape), is_p)
    observed = float(stats.welch_t_rows(pooled[None], (np.arange(9) < 5)[None])[0])
    gamma = abs(observed) * 100 * np.finfo(float).eps
    exact_p = float(np.mean(t >= observed - gamma))
    res = sps.permutation_test(
        (a, b), _welch_stat, permutation_type="independent", alternative="greater",
        n_resamples=np.inf, vectorized=True,
    )
    assert exact_p == pytest.approx(res.pvalue, abs=1e-15)
    assert exact_p == pytest.approx(4 / 126)  # Welch's t is not monotone in the mean difference


def test_permutation_p_value_rules() -> None:
    assert stats.permutation_p_value(2.0, np.array([1.0, 3.0, 2.0, np.nan])) == pytest.approx(4 / 5)
    assert stats.permutation_p_value(5.0, np.zeros(999)) == pytest.approx(1 / 1000)
    with pytest.raises(InputError):
        stats.permutation_p_value(1.0, np.array([]))


# --- scoring ----------------------------------------------------------------------------


def test_scoring_rejects_non_finite_features_naming_the_cell() -> None:
    xp = np.ones((10, 3))
    xp[7, 2] = np.nan
    with pytest.raises(InputError, match=r"row 7, column 2"):
        scoring.fit_scoring_model(xp, np.zeros((10, 3)))
    xu = np.zeros((10, 3))
    xu[4, 1] = np.inf
    with pytest.raises(InputError, match=r"row 4, column 1"):
        stats.reference_test(np.random.default_rng(0).normal(size=(10, 3)), xu, random_state=0)
    with pytest.raises(InputError, match="columns"):
        stats.reference_test(np.zeros((10, 3)), np.ones((10, 4)), random_state=0)


def test_scoring_model_is_the_specified_pipeline() -> None:
    model = scoring.make_scoring_model(random_state=7)
    scale, logistic = (step for _, step in model.steps)
    assert type(scale).__name__ == "StandardScaler"
    params = logistic.get_params()
    assert (params["C"], params["solver"], params["max_iter"], params["random_state"]) == (1.0, "lbfgs", 1000, 7)
    assert params["l1_ratio"] in (None, 0, 0.0)  # L2


def test_batched_solver_equals_the_pipeline() -> None:
    rng = np.random.default_rng(4)
    n = 120
    x = rng.normal(size=(n, K)) * rng.uniform(0.1, 20.0, K) + rng.normal(0, 5, K)
    x[:, 3] = 2.5  # a constant column
    x[:60, :4] += 0.5
    y = np.arange(n) < 60
    labels = np.stack([y, y, rng.permutation(y)])
    fit = np.stack([rng.random(n) < 0.8, rng.random(n) < 0.8, rng.random(n) < 0.8])
    # A tiny, nearly separable fitting set: 6 + 6 rows for 26 features.
    small = np.zeros(n, dtype=bool)
    small[rng.choice(60, 6, replace=False)] = True
    small[60 + rng.choice(60, 6, replace=False)] = True
    labels = np.vstack([labels, y])
    fit = np.vstack([fit, small])
    scores = scoring.batched_fit_predict(x, labels, fit)
    for i in range(len(fit)):
        model = scoring.make_scoring_model(0).set_params(logistic__tol=1e-12)
        model.fit(x[fit[i]], labels[i, fit[i]].astype(int))
        np.testing.assert_allclose(scores[i], scoring.score(model, x), atol=1e-6)


# --- sizes --------------------------------------------------------------------------------


def test_minimum_sizes() -> None:
    assert minimum_set_size(Protocol.DIRECTIONAL) == 10
    assert minimum_set_size(Protocol.REFERENCE) == 10
    assert minimum_set_size("crossfit") == 10
    assert minimum_set_size(Protocol.REFERENCE, ProtocolOptions(fit_fraction=0.7)) == 16
    assert minimum_set_size(Protocol.CROSSFIT, ProtocolOptions(n_folds=10)) == 20
    stats.check_sizes(10, 20, "reference")
    stats.check_sizes(10, 10, "reference", negative_control=False)


@pytest.mark.parametrize("protocol", list(Protocol))
def test_too_small_sets_raise(protocol: Protocol) -> None:
    with pytest.raises(InputError, match="P holds 9 images"):
        stats.check_sizes(9, 40, protocol)
    with pytest.raises(InputError, match="U holds 3 images"):
        stats.check_sizes(40, 3, protocol)
    with pytest.raises(InputError, match="negative control"):
        stats.check_sizes(40, 19, protocol)
    xp, xu = gaussian_sets(np.random.default_rng(0), 8, 30)
    with pytest.raises(InputError, match="at least 10 images per set"):
        stats.run_test(xp, xu, protocol, ProtocolOptions(n_permutations=199), random_state=0)


def test_invalid_options_raise() -> None:
    with pytest.raises(InputError):
        ProtocolOptions(fit_fraction=1.0)
    with pytest.raises(InputError):
        ProtocolOptions(n_folds=1)
    with pytest.raises(InputError, match="unknown protocol"):
        stats.check_sizes(50, 50, "bootstrap")
    xp, xu = gaussian_sets(np.random.default_rng(0), 20, 20)
    with pytest.raises(InputError, match="never below"):
        stats.crossfit_test(xp, xu, ProtocolOptions(n_permutations=99), alpha=0.01, random_state=0)
    with pytest.raises(InputError, match="same features"):
        stats.reference_test(np.ones((20, 3)), np.ones((20, 3)), random_state=0)


# --- the protocols ------------------------------------------------------------------------


def test_reference_result_and_recompute() -> None:
    xp, xu = gaussian_sets(np.random.default_rng(5), 41, 30, shift=0.3)
    res = stats.reference_test(xp, xu, random_state=11)
    assert res.protocol is Protocol.REFERENCE and res.alternative == "greater"
    assert (res.n_fit_p, res.n_test_p, res.n_fit_u, res.n_test_u) == (21, 20, 15, 15)
    assert len(res.rows) == 71 and res.rows[0].set_name == "P" and res.rows[-1].set_name == "U"
    assert all((r.role == "fit") == (r.score is None) for r in res.rows)
    again = stats.recompute(res.rows, res.protocol)
    assert (again.statistic, again.df, again.p_value) == (res.statistic, res.df, res.p_value)
    test_p = [r.score for r in res.rows if r.role == "test" and r.set_name == "P"]
    test_u = [r.score for r in res.rows if r.role == "test" and r.set_name == "U"]
    assert res.auc == stats.auc(np.array(test_p), np.array(test_u))
    assert res.direction == ("P>U" if res.statistic > 0 else "P<U")
    assert stats.reference_test(xp, xu, random_state=11) == res  # a pure function of its seed
    fresh = stats.reference_test(xp, xu)  # a drawn seed is recorded and reproduces the run
    assert stats.reference_test(xp, xu, random_state=fresh.random_state) == fresh


def test_crossfit_scores_each_image_once_with_a_scorer_that_never_saw_it() -> None:
    xp, xu = gaussian_sets(np.random.default_rng(6), 23, 27, shift=0.4)
    opts = ProtocolOptions(n_folds=5, n_permutations=199)
    res = stats.crossfit_test(xp, xu, opts, alpha=0.05, random_state=3)
    assert res.df is None and res.n_permutations == 199 and res.n_folds == 5
    assert [r.index for r in res.rows] == [*range(23), *range(27)]
    assert all(r.role == "test" and r.fold in range(5) for r in res.rows)
    folds = np.array([r.fold for r in res.rows])
    is_p = np.array([r.set_name == "P" for r in res.rows])
    for k in range(5):  # stratified: each set spread evenly over the folds
        assert (is_p & (folds == k)).sum() in (4, 5) and (~is_p & (folds == k)).sum() in (5, 6)
    # Each fold's scores are those of the pipeline fitted on the other folds.
    x = np.vstack([xp, xu])
    scores = np.array([r.score for r in res.rows])
    for k in range(5):
        model = scoring.make_scoring_model(0).set_params(logistic__tol=1e-12)
        model.fit(x[folds != k], is_p[folds != k].astype(int))
        np.testing.assert_allclose(scores[folds == k], scoring.score(model, x[folds == k]), atol=1e-6)
    assert stats.recompute(res.rows, "crossfit").statistic == res.statistic
    assert stats.crossfit_test(xp, xu, opts, alpha=0.05, random_state=3) == res


def test_crossfit_replicates_relabel_uniformly_and_stratify() -> None:
    x = np.random.default_rng(7).normal(size=(30, 4))
    rep = stats.crossfit_replicates(x, 12, 4, 2000, random_state=1)
    assert rep.is_p[0].tolist() == [True] * 12 + [False] * 18
    assert np.all(rep.is_p.sum(axis=1) == 12)
    # Under relabelling every image plays P with probability 12/30.
    np.testing.assert_allclose(rep.is_p[1:].mean(axis=0), 12 / 30, atol=0.05)
    for r in (0, 1, 500):
        for k in range(4):
            in_fold = rep.folds[r] == k
            assert (rep.is_p[r] & in_fold).sum() == 3
            assert (~rep.is_p[r] & in_fold).sum() in (4, 5)


@pytest.mark.parametrize("protocol", list(Protocol))
def test_a_shift_is_detected(protocol: Protocol) -> None:
    # Training images have lower losses: P's first columns shifted down. A learned scorer
    # finds either direction; the directional protocol only this one.
    xp, xu = gaussian_sets(np.random.default_rng(8), 100, 100, shift=-0.5)
    res = stats.run_test(xp, xu, protocol, ProtocolOptions(max_permutations=20_000), random_state=0)
    assert res.significant and res.p_value < 0.01
    assert res.direction == "P>U" and res.auc > 0.6 and res.cohens_d > 0.3


# --- the directional protocol -------------------------------------------------------------


def test_directional_is_the_default_everywhere() -> None:
    import inspect

    from cdi import audit, controls

    assert DEFAULT_PROTOCOL is Protocol.DIRECTIONAL
    assert inspect.signature(stats.run_test).parameters["protocol"].default is DEFAULT_PROTOCOL
    assert inspect.signature(controls.negative_control).parameters["protocol"].default is DEFAULT_PROTOCOL
    assert audit.AuditOptions().protocol == DEFAULT_PROTOCOL.value


def test_candidates_are_logged_standardised_group_means_without_labels() -> None:
    rng = np.random.default_rng(26)
    x = np.exp(rng.normal(size=(30, 3)))
    x[:, 2] -= 5.0  # not positive: no logarithm
    got = stats.candidate_matrix(x, ((0, 1), (2,)))
    logs = np.log(x[:, :2])
    z = (logs - logs.mean(axis=0)) / logs.std(axis=0)
    np.testing.assert_allclose(got[:, 0], -z.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got[:, 1], -(x[:, 2] - x[:, 2].mean()) / x[:, 2].std(), rtol=1e-12)
    with pytest.raises(InputError, match="beyond"):
        stats.candidate_matrix(x, ((0, 3),))


def test_the_combined_candidate_is_the_mean_of_the_others() -> None:
    rng = np.random.default_rng(27)
    x = np.exp(rng.normal(size=(30, 4)))
    groups = ((0, 1), (2,), (3,))
    plain = stats.candidate_matrix(x, groups)
    got = stats.candidate_matrix(x, groups, combined=True)
    assert got.shape == (30, 4)
    np.testing.assert_array_equal(got[:, :3], plain)
    np.testing.assert_allclose(got[:, 3], plain.mean(axis=1), rtol=1e-12)
    # One candidate has nothing to combine with.
    assert stats.candidate_matrix(x, ((0, 1),), combined=True).shape == (30, 1)


def test_a_signal_spread_thinly_over_candidates_is_found_by_their_mean() -> None:
    # Each of four independent columns lower by 0.35 sd in P: no single one reaches p < 0.01
    # at 40 + 40 images, their mean (effect 0.7 sd) does.
    rng = np.random.default_rng(28)
    xp, xu = gaussian_sets(rng, 40, 40, shift=-0.35, columns=4)
    cols = ((0,), (1,), (2,), (3,))
    alone = stats.directional_test(xp, xu, ProtocolOptions(candidates=cols, combined=False), random_state=0)
    both = stats.directional_test(xp, xu, ProtocolOptions(candidates=cols), random_state=0)
    assert not alone.significant
    assert both.significant and both.selected_column == 4


def test_welch_t_columns_equals_scipy() -> None:
    rng = np.random.default_rng(20)
    x = rng.normal(size=(25, 4)) * [1.0, 10.0, 1e-3, 1e4] + [0.0, 1e6, 5.0, -3.0]
    labels = np.array([rng.permutation(25) < 11 for _ in range(6)])
    t = stats.welch_t_columns(x, labels)
    for r in range(6):
        expected = sps.ttest_ind(x[labels[r]], x[~labels[r]], equal_var=False).statistic
        np.testing.assert_allclose(t[r], expected, rtol=1e-9)


def test_directional_detects_lower_losses_only_in_the_tested_columns() -> None:
    rng = np.random.default_rng(21)
    xp, xu = gaussian_sets(rng, 30, 30, shift=-1.0, columns=1)
    res = stats.directional_test(xp, xu, EVERY_COLUMN, random_state=0)
    assert res.significant and res.selected_column == 0 and res.statistic_name == "max_welch_t"
    # Column 0 not among the candidates: nothing else carries a signal.
    others = tuple((j,) for j in range(1, K))
    blind = stats.directional_test(xp, xu, ProtocolOptions(candidates=others), random_state=0)
    assert not blind.significant
    # A candidate averaging column 0 with another still finds it (its signal halved).
    xp2, xu2 = gaussian_sets(rng, 30, 30, shift=-2.0, columns=1)
    grouped = stats.directional_test(xp2, xu2, ProtocolOptions(candidates=((0, 1), (2, 3))), random_state=0)
    assert grouped.significant and grouped.selected_column == 0
    # P *higher* in a tested column (less member-like) is never significant.
    up = stats.directional_test(-xp, -xu, EVERY_COLUMN, random_state=0)
    assert not up.significant and up.p_value > 0.5


def test_directional_scores_carry_the_statistic_and_recompute() -> None:
    rng = np.random.default_rng(22)
    xp, xu = gaussian_sets(rng, 17, 25, shift=-0.8, columns=3)
    res = stats.directional_test(xp, xu, EVERY_COLUMN, random_state=5)
    assert [r.index for r in res.rows] == [*range(17), *range(25)]
    assert all(r.role == "test" and r.fold is None for r in res.rows)
    candidates = stats.candidate_matrix(np.vstack([xp, xu]), None, combined=True)
    column = candidates[:, res.selected_column]
    scores = np.array([r.score for r in res.rows])
    np.testing.assert_allclose(scores, (column - column.mean()) / column.std(), rtol=1e-12)
    welch = sps.ttest_ind(scores[:17], scores[17:], equal_var=False).statistic
    assert res.statistic == pytest.approx(welch, rel=1e-12)
    assert stats.recompute(res.rows, "directional").statistic == res.statistic
    assert stats.directional_test(xp, xu, EVERY_COLUMN, random_state=5) == res  # a pure function of its seed


def test_sequential_p_value_resolves_strong_evidence_and_stops_early_on_weak() -> None:
    rng = np.random.default_rng(23)
    strong = stats.directional_test(*gaussian_sets(rng, 75, 75, shift=-1.5), random_state=1)
    assert strong.p_value <= 1e-6 and strong.n_permutations == DEFAULT_MAX_PERMUTATIONS
    assert strong.p_value == 1 / (1 + DEFAULT_MAX_PERMUTATIONS) == strong.p_value_floor
    weak = stats.directional_test(*gaussian_sets(rng, 30, 30), random_state=2)
    assert weak.exceedances == DEFAULT_EXCEEDANCES
    assert weak.n_permutations is not None and weak.n_permutations < 5_000
    assert weak.p_value == DEFAULT_EXCEEDANCES / weak.n_permutations


def test_resolving_further_never_changes_the_verdict() -> None:
    # p < α depends only on the first ⌈h/α⌉ permutations: stopping at that many or at a
    # million gives the same decision on every audit, strong, weak or borderline.
    rng = np.random.default_rng(24)
    short = ProtocolOptions(max_permutations=2_000)  # h = 100, α = 0.05: 2,000 suffice
    longer = ProtocolOptions(max_permutations=50_000)
    decisions = []
    for seed in range(40):
        xp, xu = gaussian_sets(rng, 20, 20, shift=-0.2 * (seed % 5))
        full = stats.directional_test(xp, xu, longer, alpha=0.05, random_state=seed)
        brief = stats.directional_test(xp, xu, short, alpha=0.05, random_state=seed)
        assert full.significant == brief.significant, seed
        decisions.append(full.significant)
    assert 5 < sum(decisions) < 35  # both kinds of audit were tried
    with pytest.raises(InputError, match="cannot show p < α"):
        stats.directional_test(xp, xu, ProtocolOptions(max_permutations=1_000), alpha=0.05, random_state=0)


def test_directional_false_positives_on_null_data() -> None:
    # Skewed, correlated "losses" (log-normal with a shared factor), unequal set sizes.
    rng = np.random.default_rng(25)
    p = []
    for seed in range(300):
        shared = rng.normal(size=(60, 1))
        x = np.exp(0.5 * rng.normal(size=(60, K)) + shared)
        p.append(stats.directional_test(x[:20], x[20:], alpha=0.05, random_state=seed).p_value)
    values = np.array(p)
    for alpha in (0.01, 0.05):
        count = int((values < alpha).sum())
        assert count <= binomial_bound(300, alpha), (alpha, count)
    assert 0.3 < float(np.median(values)) < 0.7


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7, -0.01, float("nan"), "x"])
def test_one_rule_for_alpha(alpha: object) -> None:
    from cdi.audit import AuditOptions

    with pytest.raises(InputError, match="alpha"):
        check_alpha(alpha)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="alpha"):
        AuditOptions(alpha=alpha)  # type: ignore[arg-type]
    assert check_alpha(0.49) == 0.49


def test_p_scoring_lower_than_u_is_never_significant() -> None:
    # A learned scorer turns a feature shift in either direction into higher P scores, so
    # "P scores lower" needs a scorer that anti-generalises: P is shifted up in the fitting
    # parts and down in the test parts (the split depends only on the seed and the sizes).
    rng = np.random.default_rng(9)
    xp, xu = gaussian_sets(rng, 100, 100)
    split = stats.reference_test(xp, xu, random_state=4)
    fit_p = np.array([r.index for r in split.rows if r.set_name == "P" and r.role == "fit"])
    test_p = np.array([r.index for r in split.rows if r.set_name == "P" and r.role == "test"])
    xp[fit_p, :5] += 1.0
    xp[test_p, :5] -= 1.0
    res = stats.reference_test(xp, xu, random_state=4)
    assert res.direction == "P<U" and res.auc < 0.2
    assert res.p_value > 0.99 and not res.significant


def test_reference_false_positives_on_null_data() -> None:
    rng = np.random.default_rng(10)
    p_values = []
    for seed in range(200):
        xp, xu = gaussian_sets(rng, 50, 50)
        p_values.append(stats.reference_test(xp, xu, random_state=seed).p_value)
    p = np.array(p_values)
    for alpha in (0.01, 0.05):
        count = int((p < alpha).sum())
        assert count <= binomial_bound(200, alpha), (alpha, count)


def test_crossfit_false_positives_on_null_data() -> None:
    # Exchangeable data, the whole procedure: with 99 permutations p < 0.05 happens with
    # probability exactly 0.04 under H0, so Binomial(100, 0.05) bounds the count.
    rng = np.random.default_rng(11)
    opts = ProtocolOptions(n_folds=5, n_permutations=99)
    p = np.array(
        [
            stats.crossfit_test(*gaussian_sets(rng, 30, 30), opts, alpha=0.05, random_state=s).p_value
            for s in range(100)
        ]
    )
    count = int((p < 0.05).sum())
    assert count <= binomial_bound(100, 0.05), count
    # The p-values are not squeezed towards 1 either (a broken statistic gives p ≡ 1).
    assert 0.3 < float(np.median(p)) < 0.7


def test_result_is_frozen() -> None:
    xp, xu = gaussian_sets(np.random.default_rng(12), 20, 20)
    res = stats.reference_test(xp, xu, random_state=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.p_value = 0.0  # type: ignore[misc]


def test_the_service_form_offers_the_library_protocols_and_alpha_rule() -> None:
    from app.forms import PROTOCOLS, AuditOptionsForm

    assert set(PROTOCOLS) == {p.value for p in Protocol}
    fields = AuditOptionsForm.model_fields
    assert fields["protocol"].default == DEFAULT_PROTOCOL.value
    assert fields["alpha"].default == DEFAULT_ALPHA


def test_the_library_default_test_is_the_audits() -> None:
    # run_test(xp, xu) on the 26 features runs what every audit of them runs: the same
    # protocol, α, stopping rule and loss-type candidates (not every column). The audit
    # extracts and tests only the columns its verdict reads; the candidates are the same
    # features, so the statistics and the p-value are the same.
    from cdi.audit import AuditOptions, test_step
    from cdi.features.layout import FEATURE_NAMES, member_candidates

    assert len(FEATURE_NAMES) == K
    options = AuditOptions()
    cols = options.tested_columns
    library_groups = ProtocolOptions().candidates_for(K)
    assert library_groups == member_candidates(tuple(range(K)))[1]
    audit_groups = options.protocol_options.candidates
    assert audit_groups is not None
    assert [tuple(cols[i] for i in g) for g in audit_groups] == [tuple(g) for g in library_groups]
    assert library_groups != EVERY_COLUMN.candidates
    xp, xu = gaussian_sets(np.random.default_rng(32), 20, 24)
    library = stats.run_test(xp, xu, random_state=options.seed)
    audit = test_step(xp[:, cols], xu[:, cols], options)
    assert (library.p_value, library.statistic, library.protocol, library.alpha) == (
        audit.p_value, audit.statistic, audit.protocol, audit.alpha)
    assert library.protocol == options.protocol and library.alpha == options.alpha


def test_the_minimum_set_sizes_are_stated_once() -> None:
    # The size check, its messages, the README and the service's form (whose description the
    # web page shows) all state cdi.options.minimum_sizes.
    from pathlib import Path

    from app.forms import AuditOptionsForm
    from cdi.options import minimum_sizes

    sizes = minimum_sizes()
    stats.check_sizes(sizes.p, sizes.u, DEFAULT_PROTOCOL)
    with pytest.raises(InputError, match=f"U needs at least {sizes.u} images"):
        stats.check_sizes(sizes.p, sizes.u - 1, DEFAULT_PROTOCOL)
    with pytest.raises(InputError, match=f"at least {sizes.p} images per set"):
        stats.check_sizes(sizes.p - 1, sizes.u, DEFAULT_PROTOCOL)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"at least **{sizes.p} published and {sizes.u} unpublished images**" in readme
    described = AuditOptionsForm.model_fields["protocol"].description or ""
    assert f"at least {sizes.p} published and {sizes.u} unpublished images" in described
