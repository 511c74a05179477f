"""The features carry the membership signal of a model we trained, and the test keeps its level."""

from __future__ import annotations

import numpy as np
from scipy.stats import binom
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from cdi.features.layout import FEATURE_NAMES
from cdi.options import Protocol, ProtocolOptions
from cdi.scoring import make_scoring_model
from cdi.stats import run_test

LOSS_TYPE = ["dl", "ml_t000", "ml_t100", "ml_t200", "pia", "secmi_stat"]


def test_loss_type_features_are_lower_for_members(memorised_features):
    members, held_out = memorised_features
    held_out = held_out[:100]
    for name in LOSS_TYPE:
        j = FEATURE_NAMES.index(name)
        assert members[:, j].mean() < held_out[:, j].mean(), name


def test_logistic_regression_on_all_features_matches_the_best_single_feature(memorised_features):
    """The scoring model loses nothing against the best feature and beats all the others.

    Measured on this model (100 vs 100, 5-fold cross-validated LR against in-sample oriented
    single features): LR 0.964, PIA 0.971, DL 0.916, ML at t=200 0.884. PIA alone carries
    nearly all of the signal here; the paired bootstrap 95% interval of LR − PIA is
    [−0.024, 0.013] on these images, so "at least as high" holds only within sampling error,
    and the tolerance below is that measured spread, not a free margin.
    """
    members, held_out = memorised_features
    held_out = held_out[:100]
    x = np.vstack([members, held_out])
    y = np.r_[np.ones(len(members)), np.zeros(len(held_out))]
    single = np.array([max(roc_auc_score(y, x[:, j]), roc_auc_score(y, -x[:, j])) for j in range(x.shape[1])])
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_predict(make_scoring_model(0), x, y, cv=folds, method="predict_proba")[:, 1]
    combined = roc_auc_score(y, scores)
    by_name = dict(zip(FEATURE_NAMES, np.round(single, 3), strict=True))
    best, second = np.sort(single)[::-1][:2]
    assert combined >= best - 0.02, (combined, by_name)
    assert combined > second, (combined, by_name)


def _null_count(held_out: np.ndarray, protocol: Protocol, audits: int, n: int, alpha: float,
                options: ProtocolOptions) -> int:
    rng = np.random.default_rng(2024)
    hits = 0
    for _ in range(audits):
        idx = rng.permutation(len(held_out))[: 2 * n]
        p = run_test(held_out[idx[:n]], held_out[idx[n:]], protocol, options, alpha=alpha,
                     random_state=int(rng.integers(2**31))).p_value
        hits += p < alpha
    return hits


def _bound(audits: int, alpha: float) -> int:
    """The largest count a correct test exceeds with probability below 1e-3."""
    return int(binom.ppf(1 - 1e-3, audits, alpha))


def test_null_audits_keep_the_false_positive_rate(memorised_features):
    _, held_out = memorised_features
    for protocol, audits, perms in ((Protocol.REFERENCE, 300, 1), (Protocol.CROSSFIT, 120, 99)):
        options = ProtocolOptions(n_permutations=perms)
        count = _null_count(held_out, protocol, audits, 30, 0.05, options)
        assert count <= _bound(audits, 0.05), (protocol, count)
