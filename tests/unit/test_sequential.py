"""Sequential audits: the boundaries, their false-positive rate, early stopping, and the plumbing."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as sps

from cdi import zoo
from cdi.errors import InputError
from cdi.options import MIN_LOOK_SET, ProtocolOptions, SequentialOptions, Spending
from cdi.report import result_to_dict
from cdi.sequential import design, run_look, sequential_p_value, sequential_test, spent

FAST = ProtocolOptions(exceedances=20, max_permutations=20_000)


@pytest.mark.parametrize("rule", list(Spending))
@pytest.mark.parametrize("looks", [1, 2, 4, 7])
@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_the_looks_spend_exactly_alpha(rule: Spending, looks: int, alpha: float) -> None:
    plan = design(60, 45, SequentialOptions(True, looks, rule), alpha)
    levels = [lk.level for lk in plan.looks]
    assert 1 <= len(levels) <= looks and all(a > 0 for a in levels)
    # Every look kept but the last can be crossed by some labelling of its images.
    assert all(lk.level * math.comb(lk.n_p + lk.n_u, lk.n_p) > 1 for lk in plan.looks[:-1])
    assert math.isclose(sum(levels), alpha, rel_tol=1e-12)
    assert plan.looks[-1].spent == alpha and (plan.looks[-1].n_p, plan.looks[-1].n_u) == (60, 45)
    assert [lk.spent for lk in plan.looks] == sorted(lk.spent for lk in plan.looks)
    assert math.isclose(sum(plan.weight(k) for k in range(len(plan.looks))), 1.0, rel_tol=1e-12)


def test_spending_rules_have_their_shape() -> None:
    # O'Brien–Fleming keeps almost everything for the end; Pocock spends about evenly.
    assert spent(Spending.OBRIEN_FLEMING, 0.01, 0.25) < 1e-6 < spent(Spending.POCOCK, 0.01, 0.25)
    assert spent(Spending.POCOCK, 0.01, 0.5) == pytest.approx(0.01 * math.log1p((math.e - 1) / 2))
    assert spent(Spending.OBRIEN_FLEMING, 0.05, 1.0) == 0.05 and spent(Spending.POCOCK, 0.05, 0.0) == 0.0


def test_looks_too_small_are_merged_and_tiny_sets_refused() -> None:
    plan = design(10, 10, SequentialOptions(True, 4, Spending.POCOCK), 0.01)
    assert [(lk.n_p, lk.n_u) for lk in plan.looks] == [(5, 5), (8, 8), (10, 10)]
    assert plan.looks[0].level == pytest.approx(spent(plan.spending, 0.01, 0.5))
    # O'Brien–Fleming gives 5 + 5 images a level of 0.00027 < 1/252: that look is merged too.
    plan = design(10, 10, SequentialOptions(True, 4, Spending.OBRIEN_FLEMING), 0.01)
    assert [(lk.n_p, lk.n_u) for lk in plan.looks] == [(8, 8), (10, 10)]
    assert plan.looks[0].level == pytest.approx(spent(plan.spending, 0.01, 0.8))
    # So is a look below the permutation count's floor.
    plan = design(40, 40, SequentialOptions(True, 4, Spending.OBRIEN_FLEMING), 0.01, floor=1e-6)
    assert [(lk.n_p, lk.n_u) for lk in plan.looks] == [(20, 20), (30, 30), (40, 40)]
    with pytest.raises(InputError, match="at least 5 images per set"):
        design(MIN_LOOK_SET - 1, 20, SequentialOptions(True), 0.01)


@pytest.mark.parametrize("bad", [{"looks": 0}, {"looks": 11}, {"looks": 2.5}, {"spending": "haybittle"}])
def test_bad_sequential_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InputError):
        SequentialOptions(True, **bad)  # type: ignore[arg-type]


def _null_rejections(replicates: int, spend: bool) -> int:
    """Rejections at α = 0.05 over null data sets (20 + 20, 4 looks, Pocock)."""
    plan = design(20, 20, SequentialOptions(True, 4, Spending.POCOCK), 0.05)
    if not spend:  # the naive design: every look at the full α
        plan = replace(plan, looks=tuple(replace(lk, level=0.05) for lk in plan.looks))
    rng = np.random.default_rng(7)
    rejected = 0
    for r in range(replicates):
        x = rng.normal(size=(40, 3))
        result = sequential_test(x[:20], x[20:], plan, FAST, random_state=r)
        rejected += int(any(lk.crossed for lk in result.looks))
    return rejected


def test_false_positive_rate_stays_within_alpha_where_naive_looks_exceed_it() -> None:
    n = 300
    upper = sps.binom.ppf(0.999, n, 0.05)  # far above α·n only if the rate exceeds α
    spent_rate = _null_rejections(n, spend=True)
    naive_rate = _null_rejections(n, spend=False)
    assert spent_rate <= upper, spent_rate
    # The same check catches looking four times at the full α.
    assert naive_rate > upper, naive_rate


def test_a_strong_signal_stops_at_the_first_look() -> None:
    rng = np.random.default_rng(3)
    xp, xu = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    xp[:, 0] -= 3.0  # a training image's loss is lower
    plan = design(40, 40, SequentialOptions(True, 4, Spending.POCOCK), 0.01)
    result = sequential_test(xp, xu, plan, ProtocolOptions(), random_state=0)
    assert result.stop == "boundary" and len(result.looks) == 1
    assert (result.n_p, result.n_u) == (10, 10)
    look = result.looks[0]
    assert look.crossed and look.test.p_value < plan.looks[0].level
    assert result.p_value == pytest.approx(look.test.p_value / plan.weight(0)) and result.p_value < 0.01
    assert result.test.p_value == result.p_value and result.test.n_p == 10


def test_no_signal_runs_every_look_and_futility_stops_early() -> None:
    rng = np.random.default_rng(4)
    xp, xu = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    xp[:, :] += 1.0  # P's losses higher: it does not even lean towards "trained on"
    plan = design(40, 40, SequentialOptions(True, 4, Spending.POCOCK), 0.01)
    result = sequential_test(xp, xu, plan, FAST, random_state=0)
    assert result.stop == "final" and len(result.looks) == 4 and result.p_value >= 0.01
    futile = sequential_test(xp, xu, replace(plan, futility=True), FAST, random_state=0)
    assert futile.stop == "futility" and len(futile.looks) == 1 and futile.looks[0].futile


def test_a_crossing_look_whose_controls_fail_does_not_stop() -> None:
    rng = np.random.default_rng(3)
    xp, xu = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    xp[:, 0] -= 3.0
    plan = design(40, 40, SequentialOptions(True, 4, Spending.POCOCK), 0.01)
    seen: list[int] = []

    def controls(k: int, test: object) -> bool:
        seen.append(k)
        return k >= 2

    result = sequential_test(xp, xu, plan, ProtocolOptions(), random_state=0, controls=controls)
    assert seen == [0, 1, 2] and result.stop == "boundary" and len(result.looks) == 3
    assert [lk.controls_passed for lk in result.looks] == [False, False, True]


def test_the_sequential_p_value_is_below_alpha_exactly_when_a_look_crossed() -> None:
    plan = design(40, 40, SequentialOptions(True, 4, Spending.POCOCK), 0.01)
    levels = [lk.level for lk in plan.looks]
    assert sequential_p_value(plan, [levels[0] * 0.99]) < 0.01
    assert sequential_p_value(plan, [levels[0] * 1.01, 0.5]) >= 0.01
    assert sequential_p_value(plan, [0.9, 0.9, 0.9, levels[3] * 0.99]) < 0.01
    assert sequential_p_value(plan, [0.9, 0.9]) == 1.0


def test_a_look_needs_its_images() -> None:
    plan = design(40, 40, SequentialOptions(True, 4, Spending.POCOCK), 0.01)
    x = np.random.default_rng(0).normal(size=(12, 3))
    run_look(plan, 0, x, x, FAST, random_state=0)
    with pytest.raises(InputError, match="look 2 needs 20 \\+ 20"):
        run_look(plan, 1, x, x, FAST, random_state=0)


# --- options, CLI, HTTP form -------------------------------------------------------------------


def test_audit_options_carry_the_design() -> None:
    from cdi.audit import AuditOptions

    opts = AuditOptions(sequential=True, looks=3, spending="pocock", futility=True)
    assert opts.sequential_options == SequentialOptions(True, 3, Spending.POCOCK, True)
    assert AuditOptions().sequential is False
    with pytest.raises(InputError, match="directional protocol"):
        AuditOptions(sequential=True, protocol="reference")
    with pytest.raises(InputError, match="spending"):
        AuditOptions(spending="linear")


def test_cli_flags_reach_the_options() -> None:
    from cdi.cli import _audit_options, build_parser

    base = ["audit", "--model", "m", "--published", "p", "--unpublished", "u"]
    args = build_parser().parse_args([*base, "--sequential", "--looks", "3", "--spending", "pocock",
                                      "--futility"])
    opts = _audit_options(args)
    assert (opts.sequential, opts.looks, opts.spending, opts.futility) == (True, 3, "pocock", True)
    defaults = _audit_options(build_parser().parse_args(base))
    assert defaults.sequential_options == SequentialOptions()
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--looks", "0"])


def test_the_http_form_reads_the_same_declaration() -> None:
    from app.forms import SPENDING_RULES, AuditOptionsForm
    from app.uploads import parse_options

    assert set(SPENDING_RULES) == {s.value for s in Spending}
    default = SequentialOptions()
    fields = AuditOptionsForm.model_fields
    assert (fields["sequential"].default, fields["looks"].default, fields["spending"].default,
            fields["futility"].default) == (default.enabled, default.looks, default.spending.value, default.futility)
    opts, _ = parse_options({"sequential": "true", "looks": "3", "spending": "pocock", "futility": "1"})
    assert (opts.sequential, opts.looks, opts.spending, opts.futility) == (True, 3, "pocock", True)
    # What the worker builds from the stored options.
    from cdi.audit import AuditOptions

    stored = opts.to_dict()
    built = AuditOptions(alpha=stored["alpha"], protocol=stored["protocol"], seed=stored["seed"],
                         **{k: stored[k] for k in ("sequential", "looks", "spending", "futility")})
    assert built.sequential_options == SequentialOptions(True, 3, Spending.POCOCK, True)


# --- a real audit --------------------------------------------------------------------------------


def _png(index: int, size: int) -> object:
    from cdi.images import ImageFile
    from cdi.zoo import digits

    buf = io.BytesIO()
    digits.image(index, size).save(buf, format="PNG")
    return ImageFile(zoo.ZooModel.file_name(index), buf.getvalue())


def test_a_sequential_audit_of_a_memorising_model_stops_early_and_recomputes(tmp_path) -> None:
    import cdi
    from cdi.cli import main, summary
    from cdi.report import parse_report, recompute_report

    model = zoo.get("digits-memorised")
    n = 20
    u_idx = sorted(np.random.default_rng(1).choice(model.held_out, n, replace=False).tolist())
    published = [_png(i, model.image_size) for i in model.members[:n]]
    unpublished = [_png(i, model.image_size) for i in u_idx]
    # Through the Python API: its keyword options are AuditOptions' fields.
    result = cdi.run_audit(model.name, published, unpublished, seed=3, sequential=True,  # type: ignore[arg-type]
                           features="gradient-free")
    options = result.options
    assert options.sequential_options == SequentialOptions(True)
    seq = result.sequential
    assert seq is not None and result.outcome == "used", result.verdict.reason
    assert seq.stop == "boundary" and len(seq.looks) < len(seq.design.looks)
    used = len(result.images_p) + len(result.images_u)
    assert used == seq.n_p + seq.n_u < 2 * n and len(result.unused) == 2 * n - used
    assert all(np.isfinite(im.features[options.features.columns]).all() for im in result.images_p)
    assert "Sequential audit" in result.verdict.reason and "images used" in summary(result)

    document = result_to_dict(result)
    record = document["sequential"]
    assert record["stop"] == "boundary" and record["p_value"] == document["p_value"] < 0.01
    assert len(record["unused"]) == len(result.unused) and len(document["images"]) == used
    assert record["looks"][-1]["crossed"] and record["looks"][-1]["controls_passed"]
    check = recompute_report(parse_report(document))
    assert check.ok, [(c.group, c.name, c.recorded, c.recomputed) for c in check.failures]
    assert any(c.group == "sequential" for c in check.checks)
    # The PDF's section on the looks (the whole PDF is tested in test_report_pdf.py).
    from cdi.report.pdf import _fonts, _sequential, _styles

    _fonts()
    from cdi.report.explain import explain

    assert any("Not needed" in line for line in explain(parse_report(document)).tested)
    flow = _sequential(parse_report(document), _styles(), 400.0)
    assert "Sequential audit" in flow[0].text and f"{used} of {2 * n} images were used" in flow[1].text

    # A tampered look is caught; the command line says so.
    tampered = json.loads(json.dumps(document))
    tampered["sequential"]["looks"][0]["test"]["p_value"] = 0.5
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(tampered))
    assert not recompute_report(parse_report(tampered)).ok
    assert main(["recompute", str(path)]) != 0
