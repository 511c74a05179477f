"""The report's PDF (cdi.report.render_pdf): what a reader finds in it, read back with pypdf."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from test_report import synthetic_result

from cdi.report import Report, build_report, render_pdf, seal, subsampling_curve

pypdf = pytest.importorskip("pypdf")


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """A used, a not detected and an inconclusive report, each with its PDF and its pages' text."""
    out: dict[str, dict[str, Any]] = {}
    for verdict, (kind, seed) in {"used": ("used", 0), "not_detected": ("null", 3),
                                  "inconclusive": ("shift", 1)}.items():
        report = seal(build_report(synthetic_result(kind, seed=seed)))
        assert report.verdict == verdict
        pdf = render_pdf(report, curve=subsampling_curve(report, n_sizes=2, draws=1))
        reader = pypdf.PdfReader(io.BytesIO(pdf))
        out[verdict] = {"report": report, "pdf": pdf, "reader": reader,
                        "pages": [page.extract_text() for page in reader.pages]}
    return out


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("verdict", ["used", "not_detected", "inconclusive"])
def test_every_page_shows_the_digest_and_page_one_the_verdict(rendered, verdict: str) -> None:
    r = rendered[verdict]
    report: Report = r["report"]
    pages = r["pages"]
    assert 6 <= len(pages) <= 10
    assert report.digest is not None
    for i, text in enumerate(pages, 1):
        assert report.digest in text, f"page {i} lacks the digest"
        assert f"page {i} of {len(pages)}" in text
    first = _flat(pages[0])
    label = {"used": "USED", "not_detected": "NOT DETECTED", "inconclusive": "INCONCLUSIVE"}[verdict]
    assert f"Verdict: {label}" in first
    assert f"p-value: {report.p_value:.3g}" in first and "α = 0.01" in first
    assert "What was tested" in first and "30 images" in first and "40 comparable images" in first
    assert "What this means" in first and "What this does not mean" in first
    for control in ("Negative control", "Direction check", "Distribution check", "Duplicates"):
        assert control in first


def test_the_plain_language_says_what_each_verdict_does_not_mean(rendered) -> None:
    used = _flat(rendered["used"]["pages"][0])
    assert "Evidence found" in used and "is not the probability that the model was not trained" in used
    not_detected = _flat(rendered["not_detected"]["pages"][0])
    assert "It is not proof that the model was not trained on these images" in not_detected
    assert "not below the threshold" in not_detected
    inconclusive = _flat(rendered["inconclusive"]["pages"][0])
    assert "Distribution check FAILED" in inconclusive
    assert "neither evidence that the model was trained" in inconclusive


@pytest.mark.parametrize("verdict", ["used", "not_detected", "inconclusive"])
def test_all_figures_and_the_appendix_are_there(rendered, verdict: str) -> None:
    r = rendered[verdict]
    text = _flat(" ".join(r["pages"]))
    for caption in ("Figure 1. Score distributions", "Figure 2. p-value against the number of images",
                    "Figure 3. Negative control", "Figure 4. Distribution check"):
        assert caption in text
    images = sum(len(page.images) for page in r["reader"].pages)
    assert images == 5  # the p-value scale on page 1 and the four figures
    report: Report = r["report"]
    for needle in ("Appendix A. Manifest", report.manifest.model.digest, report.manifest.feature_key,
                   "Appendix C. The audited images", report.images[-1].sha256, "Appendix D. Integrity",
                   "jcs-rfc8785", f"seed of the test {report.test.random_state}"):
        assert needle in text, needle
    for name, sha in report.manifest.model.weight_sha256.items():
        assert sha in text and name in text


def test_same_report_same_bytes_and_the_curve_follows_its_seed() -> None:
    report = seal(build_report(synthetic_result("used", protocol="reference", features="gradient-free", seed=2)))
    curve = subsampling_curve(report, draws=5)
    assert curve.p_values.shape == (len(curve.sizes_p), 5) and curve.sizes_p[-1] == report.test.n_p
    assert curve.sizes_p[0] == 10 and all(u >= 10 for u in curve.sizes_u)
    again = subsampling_curve(report, draws=5)
    assert (again.p_values == curve.p_values).all()
    assert render_pdf(report, curve=curve) == render_pdf(report, curve=again)


def test_the_pdf_is_dated_when_its_report_was_built(rendered) -> None:
    """Built invariant (the same report gives the same bytes), the PDF still carries a real date:
    its report's creation time, not reportlab's fixed 2000-01-01."""
    from datetime import timezone

    for entry in rendered.values():
        created = entry["report"].created_at.astimezone(timezone.utc)
        info = entry["reader"].metadata
        assert info.creation_date is not None and info.modification_date is not None
        assert info.creation_date.replace(tzinfo=timezone.utc) == created.replace(microsecond=0)
        assert info.creation_date.year != 2000


def test_the_score_is_explained_once_per_protocol(rendered) -> None:
    """Figure 1 and Appendix C say what a score is under the audit's own protocol (cdi.report.scores)."""
    from cdi.report.scores import score_meaning

    for entry in rendered.values():
        t = entry["report"].test
        text = _flat(" ".join(entry["pages"]))
        meaning = _flat(score_meaning(t.protocol, t.selected_feature))
        assert text.count(meaning[:60]) >= 2, (t.protocol, meaning)  # Figure 1's caption and Appendix C
        if t.protocol == "directional":
            assert "estimate that the image is in P" not in text
    assert score_meaning("directional", "dl") != score_meaning("reference") != score_meaning("crossfit")


def test_a_verdict_reports_pdf_says_which_features_were_not_computed() -> None:
    PdfReader = pypdf.PdfReader
    report = seal(build_report(synthetic_result("used", protocol="directional", features="verdict", seed=5)))
    text = _flat(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(render_pdf(report))).pages))
    assert "features computed 6 of 26: dl, pia, ml_t000, ml_t100, ml_t200, ml_t300" in text
    assert "not computed" in text
    everything = seal(build_report(synthetic_result("used", protocol="directional", features="all", seed=5)))
    text = _flat(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(render_pdf(everything))).pages))
    assert "features computed" not in text
