"""The report's plain-language explanation, shared by the PDF's first page and the web page.

The texts speak to the data owner, not to a statistician. They use a small markup that both
reportlab paragraphs and HTML read alike: ``<b>``, ``<i>``, the mono span the caller names
(``mono``: a reportlab ``<font face>`` in the PDF, ``<code>`` on the web) and XML escapes;
every value taken from the report is escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from cdi.report.model import Report

__all__ = ["MONO_HTML", "MONO_PDF", "ControlLine", "Explanation", "explain"]

#: The mono span in the PDF (the renderer registers the font) and in HTML.
MONO_PDF = ("<font face='CDIMono'>", "</font>")
MONO_HTML = ("<code>", "</code>")

VERDICT_LABELS = {"used": "USED", "not_detected": "NOT DETECTED", "inconclusive": "INCONCLUSIVE"}


def _e(value: Any) -> str:
    return escape(str(value))


def _p(value: float) -> str:
    return f"{value:.3g}"


def _pct(alpha: float) -> str:
    return f"{alpha * 100:g} %"


@dataclass(frozen=True)
class ControlLine:
    """One row of the controls table: the control, its outcome (``FAILED`` when failed), why."""

    name: str
    outcome: str
    text: str

    @property
    def failed(self) -> bool:
        return self.outcome == "FAILED"


@dataclass(frozen=True)
class Explanation:
    """Everything the first page says, in reading order."""

    verdict: str
    label: str
    headline: str
    p_value: str
    tested: tuple[str, ...]
    means: str
    not_means: str
    controls: tuple[ControlLine, ...]
    warnings: tuple[str, ...]
    check: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "label": self.label, "headline": self.headline, "p_value": self.p_value,
            "tested": list(self.tested), "means": self.means, "not_means": self.not_means,
            "controls": [{"name": c.name, "outcome": c.outcome, "text": c.text, "failed": c.failed}
                         for c in self.controls],
            "warnings": list(self.warnings), "check": self.check,
        }


def explain(report: Report, mono: tuple[str, str] = MONO_PDF) -> Explanation:
    """The plain-language explanation of ``report`` (see the module docstring for the markup)."""
    t = report.test
    below = t.p_value < t.alpha
    floor = ""
    if t.p_value_floor is not None and t.p_value <= t.p_value_floor:
        floor = (f" (the smallest value this test can give with {t.n_permutations:,} permutations: the evidence "
                 f"may be stronger still)")
    p_text = (
        f"<b>p-value: {_p(t.p_value)}</b>{floor} — {'below' if below else 'not below'} the threshold "
        f"α = {t.alpha:g} fixed before the audit. The p-value is the probability of a difference at least "
        f"this large between the published and the unpublished images if the model had not been trained on "
        f"the published ones: the smaller it is, the stronger the evidence.")
    n_excl = len(report.controls.excluded.p) + len(report.controls.excluded.u)
    tested = [
        f"<b>Model:</b> {model_line(report)}",
        f"<b>Published images (P):</b> {t.n_p} images the owner made public and suspects were used for "
        f"training.",
        f"<b>Unpublished images (U):</b> {t.n_u} comparable images the owner never made public, which the "
        f"model cannot have seen.",
    ]
    if n_excl:
        tested.append(f"<b>Left out:</b> {n_excl} duplicate image(s) (see the controls below).")
    seq = report.sequential
    if seq is not None and seq.unused:
        tested.append(f"<b>Not needed:</b> {len(seq.unused)} more image(s) were submitted but never run through the "
                      f"model: the audit looked at the evidence in rounds and stopped once it was clear (see "
                      f"Sequential audit below).")
    tested.append(f"<b>Method:</b> CDI ({_e(t.protocol)} protocol, one-sided test), report created "
                  f"{report.created_at.strftime('%Y-%m-%d %H:%M UTC')}.")
    means, not_means = meaning(report)
    return Explanation(
        verdict=report.verdict, label=VERDICT_LABELS[report.verdict], headline=headline(report), p_value=p_text,
        tested=tuple(tested), means=means, not_means=not_means,
        controls=tuple(ControlLine(*row) for row in control_rows(report)),
        warnings=tuple(_e(w) for w in report.warnings), check=check_text(report, mono),
    )


def headline(report: Report) -> str:
    return {
        "used": "Evidence found that the model was trained on the published images.",
        "not_detected": "No evidence found that the model was trained on the published images.",
        "inconclusive": "The checks on the data failed, so the audit cannot give a verdict.",
    }[report.verdict]


def failed_controls(report: Report) -> list[str]:
    out = []
    if report.decision.negative_control_failed:
        out.append("the negative control found a difference between two random halves of the unpublished "
                   "images, where there can be none")
    if report.decision.direction_check_failed:
        out.append("the published images look less like training data than the unpublished ones, so the "
                   "unpublished set may hold training images, or the two sets may have been swapped")
    if report.decision.distribution_shift:
        out.append("a classifier that ignores the model can tell the published from the unpublished images "
                   "by simple image statistics, so the two sets are not comparable")
    return out


def meaning(report: Report) -> tuple[str, str]:
    p, a = _p(report.p_value), f"{report.alpha:g}"
    if report.verdict == "used":
        means = (
            f"The model fits the published images (P) better than comparable images it cannot have seen (U), "
            f"as models fit the images they were trained on. If the model had <b>not</b> been trained on P, a "
            f"difference at least this large would come up by chance with probability {p} (the p-value), "
            f"below the threshold of {a} fixed before the audit. The checks on the data passed, so the "
            f"difference is not explained by a flaw in the data that they can detect.")
        not_means = (
            f"It does not say which individual images were used, how the model came to be trained on them, "
            f"or whether that use was permitted: those are questions for people, not for this test. The "
            f"p-value is not the probability that the model was not trained on P. At this threshold, an "
            f"audit of a model that never saw P reports \u201cused\u201d at most {_pct(report.alpha)} of the "
            f"time.")
    elif report.verdict == "not_detected":
        means = (
            f"The model did not treat the published images (P) differently enough from comparable images it "
            f"cannot have seen (U) to conclude that it was trained on them: the p-value {p} is not below the "
            f"threshold of {a} fixed before the audit.")
        not_means = (
            "<b>It is not proof that the model was not trained on these images.</b> The test may lack "
            "power: the model may have seen the images too rarely to keep a trace of them, the sets may be "
            "too small (Figure 2 shows how the p-value changes with the number of images), or the model may "
            "have been trained on altered copies. Absence of evidence is not evidence of absence.")
    else:
        failed = "; and ".join(failed_controls(report))
        means = (
            f"A check on the data failed: {failed}. When a check fails, the test's p-value cannot be trusted "
            f"in either direction, so the audit draws no conclusion. (For the record, the test's p-value was "
            f"{p} against a threshold of {a}.)")
        not_means = (
            "It is neither evidence that the model was trained on the published images nor evidence that it "
            "was not. Repeat the audit with unpublished images that match the published ones more closely: "
            "same source, format, size and processing.")
    return means, not_means


def control_rows(report: Report) -> list[tuple[str, str, str]]:
    nc = report.controls.negative_control
    d = report.controls.distribution_check
    a = f"{report.alpha:g}"
    if nc.significant:
        nc_row = ("Negative control", "FAILED",
                  f"The same test, run on two random halves of the unpublished images, found a difference "
                  f"(p = {_p(nc.p_value)} &lt; {a}). There is none to find, so something in the data or in "
                  f"the pipeline breaks the test's assumptions.")
    else:
        nc_row = ("Negative control", "passed",
                  f"The same test, run on two random halves of the unpublished images, found no difference "
                  f"(p = {_p(nc.p_value)}), as it should.")
    dc = report.controls.direction_check
    if dc.p_value is None:
        dir_row = ("Direction check", "not run", "The direction check was not run for this audit.")
    elif dc.failed:
        dir_row = ("Direction check", "FAILED",
                   f"The published images look <i>less</i> like training data than the unpublished ones "
                   f"(p = {_p(dc.p_value)} &lt; {a}): the unpublished set may hold training images, or the "
                   f"two sets may have been swapped.")
    else:
        dir_row = ("Direction check", "passed",
                   f"The published images do not look less like training data than the unpublished ones "
                   f"(p = {_p(dc.p_value)}).")
    stats = ", ".join(_e(s.name) for s in d.largest_differences[:3])
    if d.shift:
        dc_row = ("Distribution check", "FAILED",
                  f"A classifier that ignores the model and looks only at simple image statistics (size, "
                  f"colour, sharpness, file format) tells the two sets apart (AUC {d.auc:.2f}, where 0.5 is "
                  f"chance; p = {_p(d.p_value)}). They differ most in: {stats or 'no single statistic'}.")
    elif d.warning:
        dc_row = ("Distribution check", "passed, with a warning",
                  f"A classifier using only simple image statistics finds a small but significant difference "
                  f"between the sets (AUC {d.auc:.2f} &lt; {report.decision.auc_threshold:g}, p = "
                  f"{_p(d.p_value)}), too weak to explain a detection ({stats or 'no single statistic'}).")
    else:
        dc_row = ("Distribution check", "passed",
                  f"A classifier that ignores the model and looks only at simple image statistics (size, "
                  f"colour, sharpness, file format) could not tell the two sets apart (AUC {d.auc:.2f}, where "
                  f"0.5 is chance; p = {_p(d.p_value)}).")
    excl = report.controls.excluded
    groups = report.controls.duplicates.groups
    n_excl = len(excl.p) + len(excl.u)
    if groups:
        dup_row = ("Duplicates", "found",
                   f"{len(groups)} group(s) of identical or near-identical images; {n_excl} image(s) were left "
                   f"out of the audit (Appendix B).")
    else:
        dup_row = ("Duplicates", "none", "No image appears twice, within or across the two sets.")
    return [nc_row, dir_row, dc_row, dup_row]


def model_line(report: Report) -> str:
    m = report.manifest.model
    revision = f", revision {_e(m.revision)}" if m.revision else ""
    n = len(m.weight_sha256)
    weights = ("its weight file is identified by its SHA-256" if n == 1
               else f"its {n} weight files are identified by their SHA-256")
    return (f"<b>{_e(m.source)}</b>{revision} ({_e(m.family)} diffusion model, {m.image_size}×{m.image_size} "
            f"pixels); {weights} (Appendix A).")


def check_text(report: Report, mono: tuple[str, str] = MONO_PDF) -> str:
    a, z = mono
    if report.integrity is None:
        return ("This report is <b>not sealed</b>: it carries no digest, so nothing ties it to a JSON file. "
                "Ask for the sealed report.")
    sig = report.integrity.signature
    signed = (f"It is signed with Ed25519 key {a}{sig.key_id}{z}; "
              f"{a}cdi verify --public-key KEY report.json{z} checks the signature against "
              f"the key published by whoever ran the audit. " if sig else "It is not signed. ")
    if mono == MONO_HTML:
        opening = (f"The JSON report's SHA-256 digest is {a}{report.integrity.digest}{z}; the PDF prints it at the "
                   f"foot of every page. {a}cdi verify report.json{z} checks that the JSON file is the one "
                   f"shown here, unaltered. ")
    else:
        opening = (f"This PDF renders a JSON report whose SHA-256 digest is printed at the foot of every page. "
                   f"{a}cdi verify report.json{z} checks that the JSON file is the one this PDF "
                   f"shows, unaltered. ")
    return (f"{opening}{signed}{a}cdi recompute report.json{z} reruns the test "
            f"from the per-image data the JSON file holds and confirms the p-value and the verdict.")
