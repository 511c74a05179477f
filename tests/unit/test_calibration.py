"""Difficulty calibration, the shift control and assess() (cdi.calibration, cdi.assess)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from cdi.assess import Assessment, assess, calibrated_test, member_likeness
from cdi.calibration import DESCRIPTOR_NAMES, calibrate, image_descriptors, shift_check
from cdi.controls import IMAGE_STATISTIC_NAMES
from cdi.errors import InputError
from cdi.features.layout import FEATURE_NAMES, FeatureSet, member_candidates
from cdi.stats import ProtocolOptions
from cdi.verdict import Outcome

COLUMNS = FeatureSet.GRADIENT_FREE.columns
OPTIONS = ProtocolOptions(candidates=member_candidates(COLUMNS)[1], max_permutations=20_000)
LOSSES = [FEATURE_NAMES.index(n) for n in ("dl", "pia", "ml_t000", "ml_t100", "ml_t200", "ml_t300")]
BRIGHTNESS = DESCRIPTOR_NAMES.index("brightness")
COLOUR = DESCRIPTOR_NAMES.index("colourfulness")


def images(n: int, rng: np.random.Generator, *, brightness: float = 0.0, colour: float = 0.0,
           member: float = 0.0, difficulty: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic images: 26 features, 7 descriptors, file statistics.

    Each image's losses grow with its brightness (``difficulty`` log-units per unit), shrink
    by ``member`` for a training image, and do not depend on its colour at all.
    """
    d = rng.normal(size=(n, len(DESCRIPTOR_NAMES)))
    d[:, BRIGHTNESS] += brightness
    d[:, COLOUR] += colour
    log_loss = difficulty * d[:, BRIGHTNESS:BRIGHTNESS + 1] + 0.3 * rng.normal(size=(n, 1)) - member
    f = np.exp(log_loss + 0.3 * rng.normal(size=(n, len(FEATURE_NAMES))))
    s = rng.normal(size=(n, len(IMAGE_STATISTIC_NAMES)))
    s[:, 0] += 3 * colour  # the file statistics see the colour difference too
    s[:, 1] += 3 * brightness
    return f, d, s


def run(p: tuple[np.ndarray, ...], u: tuple[np.ndarray, ...], seed: int = 0,
        distribution: Literal["always", "when_used", "never"] = "always") -> Assessment:
    return assess(p[0], u[0], p[1], u[1], p[2], u[2], columns=COLUMNS, protocol="directional", options=OPTIONS,
                  alpha=0.01, seed=seed, distribution=distribution)


def test_descriptors_of_grey_and_colour_images() -> None:
    dark = np.full((1, 8, 8), -0.8)
    bright = np.full((3, 8, 8), 0.8)
    bright[0] += 0.1  # a red cast
    dd, db = image_descriptors(dark), image_descriptors(bright)
    assert dd.shape == (len(DESCRIPTOR_NAMES),)
    assert dd[BRIGHTNESS] < 0.2 < db[BRIGHTNESS]
    assert dd[DESCRIPTOR_NAMES.index("dark_share")] == 1.0 and db[DESCRIPTOR_NAMES.index("bright_share")] == 1.0
    assert dd[COLOUR] == 0.0 < db[COLOUR]
    noisy = np.random.default_rng(0).uniform(-1, 1, size=(1, 8, 8))
    assert image_descriptors(noisy)[DESCRIPTOR_NAMES.index("bytes_per_pixel")] > dd[DESCRIPTOR_NAMES.index(
        "bytes_per_pixel")]
    assert image_descriptors(noisy)[DESCRIPTOR_NAMES.index("edge_energy")] > 0 == dd[DESCRIPTOR_NAMES.index(
        "edge_energy")]
    with pytest.raises(InputError, match="descriptors need"):
        image_descriptors(np.zeros((2, 8, 8)))
    with pytest.raises(InputError, match="finite"):
        image_descriptors(np.full((1, 4, 4), np.nan))


def test_calibration_ignores_the_labels() -> None:
    """The residuals depend on the pooled images only: relabelling reorders them alike."""
    rng = np.random.default_rng(1)
    values, desc = rng.normal(size=(40, 4)), rng.normal(size=(40, 7))
    values[:, 0] += 2 * desc[:, 0]
    r = calibrate(values, desc)
    perm = rng.permutation(40)
    np.testing.assert_allclose(calibrate(values[perm], desc[perm]), r[perm], atol=1e-12)
    # What the descriptors explain is gone: the first column no longer follows descriptor 0.
    assert abs(np.corrcoef(values[:, 0], desc[:, 0])[0, 1]) > 0.8
    assert abs(np.corrcoef(r[:, 0], desc[:, 0])[0, 1]) < 0.2
    with pytest.raises(InputError, match="rows"):
        calibrate(values, desc[:10])


def test_calibrated_statistic_depends_on_the_labelling_alone() -> None:
    """Reordering the images (and their labels) alike leaves every labelling's statistic unchanged:
    the permutation test compares like with like, as its exactness needs."""
    from cdi.calibration import calibrated_statistics, design_matrix

    rng = np.random.default_rng(2)
    values, desc = rng.normal(size=(30, 4)), rng.normal(size=(30, len(DESCRIPTOR_NAMES)))
    labels = rng.permuted(np.broadcast_to(np.arange(30), (5, 30)), axis=1) < 12
    perm = rng.permutation(30)
    a = calibrated_statistics(values, design_matrix(desc), labels)
    b = calibrated_statistics(values[perm], design_matrix(desc[perm]), labels[:, perm])
    np.testing.assert_allclose(a, b, atol=1e-9)
    p, u = images(12, rng), images(18, rng)
    observed = calibrated_test(p[0][:, COLUMNS], u[0][:, COLUMNS], p[1], u[1], OPTIONS, alpha=0.01, random_state=0)
    assert 0 < observed.p_value <= 1 and observed.n_p == 12 and observed.selected_column is not None


def test_calibrated_test_holds_its_level_when_p_is_darker() -> None:
    """Exchangeable residuals: a darker P (whose raw losses are lower) is rejected at about α."""
    rng = np.random.default_rng(3)
    rejections_raw = rejections_cal = 0
    runs = 60
    for k in range(runs):
        p, u = images(20, rng, brightness=-1.0), images(20, rng)
        a = run(p, u, seed=k, distribution="when_used")
        rejections_raw += a.test.p_value < 0.01
        rejections_cal += a.calibrated is not None and a.calibrated.p_value < 0.01
        assert a.verdict.outcome is not Outcome.USED, a.verdict.reason
    assert rejections_raw > runs / 2  # the plain test is fooled ...
    assert rejections_cal <= 3  # ... the calibrated one is not


def test_darker_p_is_not_used_and_names_the_difference() -> None:
    rng = np.random.default_rng(4)
    p, u = images(30, rng, brightness=-1.5), images(30, rng)
    a = run(p, u)
    assert a.test.p_value < 0.01  # the raw test fires
    assert a.shift.shifted and a.verdict.outcome is Outcome.INCONCLUSIVE
    assert a.verdict.shift_failed
    assert "darker" in a.verdict.reason and "choose U from the same" in a.verdict.reason
    assert a.verdict.fix is not None and a.verdict.fix.startswith("P's images are darker than U's")


def test_colour_cast_alone_is_not_inconclusive() -> None:
    """A colour difference the losses do not follow: the distribution check sees it, the verdict does not."""
    rng = np.random.default_rng(5)
    p, u = images(30, rng, colour=2.0), images(30, rng)
    a = run(p, u)
    assert a.distribution is not None and a.distribution.p_value < 0.01 and a.distribution.auc > 0.9
    assert a.verdict.outcome is Outcome.NOT_DETECTED, a.verdict.reason
    assert not a.verdict.distribution_shift and a.verdict.warnings


def test_members_with_no_shift_are_used() -> None:
    rng = np.random.default_rng(6)
    p, u = images(30, rng, member=0.6, difficulty=0.2), images(30, rng, difficulty=0.2)
    a = run(p, u)
    assert a.verdict.outcome is Outcome.USED, a.verdict.reason
    assert a.calibrated is not None and a.verdict.p_value == max(a.test.p_value, a.calibrated.p_value)
    assert "difficulty-calibrated" in a.verdict.reason


def test_raw_detection_the_calibration_does_not_confirm_is_not_used() -> None:
    """The intersection–union rule: a raw rejection alone is never `used`."""
    from cdi.verdict import decide

    rng = np.random.default_rng(7)
    p, u = images(30, rng, member=0.6, difficulty=0.2), images(30, rng, difficulty=0.2)
    a = run(p, u)
    null_p, null_u = images(30, rng), images(30, rng)
    unconfirmed = run(null_p, null_u).calibrated
    assert unconfirmed is not None and unconfirmed.p_value >= 0.01
    v = decide(a.test, a.negative_control, a.distribution, reversal_p=a.reversal_p, calibrated=unconfirmed,
               shift=a.shift)
    assert v.outcome is Outcome.NOT_DETECTED and "calibrated" in v.reason
    assert v.p_value == unconfirmed.p_value


def test_shift_check_validates_and_reads_as_words() -> None:
    rng = np.random.default_rng(8)
    p, u = images(25, rng, brightness=-2.0), images(25, rng)
    x = np.vstack([p[0], u[0]])[:, COLUMNS]
    res = shift_check(member_likeness(x, OPTIONS), np.vstack([p[1], u[1]]), 25)
    assert res.shifted and res.differences[0].name == "brightness" and res.differences[0].contribution > 0
    assert res.words().startswith("P's images are darker than U's")
    brighter = shift_check(member_likeness(x[::-1], OPTIONS), np.vstack([p[1], u[1]])[::-1], 25)
    assert not brighter.shifted  # brighter P predicts *higher* losses: nothing to fear
    with pytest.raises(InputError, match="at least 2"):
        shift_check(np.zeros(5), np.zeros((5, 7)), 1)
    assert LOSSES  # the synthetic losses cover the candidates' features


def test_class_check_finds_different_classes_and_ignores_a_random_split() -> None:
    from cdi.calibration import class_check

    rng = np.random.default_rng(9)
    mixed = rng.integers(0, 10, size=60).tolist()
    p_same, _ = class_check(mixed, 30, random_state=1)
    split = [int(c) for c in rng.integers(0, 5, size=30)] + [int(c) for c in rng.integers(5, 10, size=30)]
    p_split, words = class_check(split, 30, random_state=1)
    assert p_same > 0.05 and p_split < 0.01
    assert "P and U hold different classes" in words and "in P" in words


def test_a_class_mix_that_moves_the_losses_is_inconclusive_for_a_class_conditional_model() -> None:
    rng = np.random.default_rng(10)
    p, u = images(30, rng, difficulty=0.2), images(30, rng, difficulty=0.2)
    p[0][:] *= 0.5  # P's classes are easier for the model; nothing in the descriptors shows it
    classes = [1] * 30 + [7] * 30
    a = assess(p[0], u[0], p[1], u[1], p[2], u[2], columns=COLUMNS, protocol="directional", options=OPTIONS,
               alpha=0.01, seed=0, classes=classes, distribution="when_used")
    assert a.test.p_value < 0.01 and a.shift.classes_shifted
    assert a.verdict.outcome is Outcome.INCONCLUSIVE and "different classes" in a.verdict.reason


def test_the_calibrated_test_is_resolved_as_far_as_a_sequential_looks_level_needs() -> None:
    # A look tested at level α·w must be able to show p < α·w: the permutations stop at
    # ⌈h / (α·w)⌉, not ⌈h / α⌉ (whose floor, divided by w, could never fall below α).
    import math

    rng = np.random.default_rng(5)
    n = 30
    xp, xu = np.exp(rng.normal(size=(n, 6)) - 2.0), np.exp(rng.normal(size=(n, 6)))
    dp, du = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    options = ProtocolOptions(exceedances=5, candidates=member_candidates([0, 2, 14, 15, 16, 17])[1])
    alpha, weight = 0.01, 0.01
    plain = calibrated_test(xp, xu, dp, du, options, alpha=alpha, random_state=0)
    assert plain.n_permutations == math.ceil(5 / alpha) and plain.p_value / weight >= alpha
    look = calibrated_test(xp, xu, dp, du, options, alpha=alpha, random_state=0, level=alpha * weight)
    assert look.n_permutations == math.ceil(5 / (alpha * weight))
    assert look.p_value / weight < alpha
