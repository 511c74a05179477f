"""The report as a PDF (reportlab for the layout, matplotlib for the figures).

* Page 1 speaks to the data owner, not to a statistician: what was tested, the verdict, the
  p-value against the threshold, what the verdict means and what it does not mean, the
  controls' outcome, and how to check the report.
* Then the statistics and four figures: the score distributions of P and U, the p-value as
  a function of the number of images (:mod:`cdi.report.curve`), the negative control and the
  distribution check.
* The appendix: the manifest and every parameter, the duplicates, every image with its
  SHA-256 and score, and the report's integrity.

The report's digest is printed at the foot of every page. The PDF is a rendering of the JSON
report (it reads nothing else), and the same report renders to the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from cdi.report.model import Report
from cdi.report.scores import score_meaning

if TYPE_CHECKING:
    from cdi.report.curve import SubsamplingCurve

__all__ = ["MAX_IMAGE_ROWS", "render_pdf"]

#: The appendix lists at most this many images (the JSON report holds all of them).
MAX_IMAGE_ROWS = 500

_SANS, _MONO = "CDISans", "CDIMono"
_VERDICT_STYLE = {
    "used": ("USED", "#922b21", "#f9ebea"),
    "not_detected": ("NOT DETECTED", "#1f4e79", "#eaf2f8"),
    "inconclusive": ("INCONCLUSIVE", "#7e5109", "#fef5e7"),
}


@lru_cache(maxsize=1)
def _fonts() -> None:
    """Register DejaVu (shipped with matplotlib): Unicode (α, ≥, −) in every viewer, embedded."""
    from pathlib import Path

    import matplotlib
    from reportlab.lib.fonts import addMapping
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    faces = {
        (_SANS, 0, 0): "DejaVuSans.ttf", (_SANS, 1, 0): "DejaVuSans-Bold.ttf",
        (_SANS, 0, 1): "DejaVuSans-Oblique.ttf", (_SANS, 1, 1): "DejaVuSans-BoldOblique.ttf",
        (_MONO, 0, 0): "DejaVuSansMono.ttf", (_MONO, 1, 0): "DejaVuSansMono-Bold.ttf",
        (_MONO, 0, 1): "DejaVuSansMono-Oblique.ttf", (_MONO, 1, 1): "DejaVuSansMono-BoldOblique.ttf",
    }
    for (family, bold, italic), file in faces.items():
        name = family + ("-Bold" if bold else "") + ("-Italic" if italic else "")
        pdfmetrics.registerFont(TTFont(name, str(ttf / file)))
        addMapping(family, bold, italic, name)


def _styles() -> dict[str, Any]:
    from reportlab.lib.colors import HexColor
    from reportlab.lib.styles import ParagraphStyle

    base = ParagraphStyle("body", fontName=_SANS, fontSize=9.5, leading=12.6, spaceAfter=4)
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=8, leading=10.2),
        "caption": ParagraphStyle("caption", parent=base, fontSize=8, leading=10.2, textColor=HexColor("#333333"),
                                  spaceAfter=10),
        "title": ParagraphStyle("title", parent=base, fontName=_SANS + "-Bold", fontSize=17, leading=21,
                                spaceAfter=2),
        "subtitle": ParagraphStyle("subtitle", parent=base, fontSize=10, textColor=HexColor("#555555"),
                                   spaceAfter=8),
        "h1": ParagraphStyle("h1", parent=base, fontName=_SANS + "-Bold", fontSize=13, leading=16, spaceBefore=4,
                             spaceAfter=6),
        "h2": ParagraphStyle("h2", parent=base, fontName=_SANS + "-Bold", fontSize=10.5, leading=13,
                             spaceBefore=7, spaceAfter=3),
        "cell": ParagraphStyle("cell", parent=base, fontSize=8, leading=10, spaceAfter=0),
        "cellbold": ParagraphStyle("cellbold", parent=base, fontName=_SANS + "-Bold", fontSize=8, leading=10,
                                   spaceAfter=0),
        "mono": ParagraphStyle("mono", parent=base, fontName=_MONO, fontSize=7, leading=9, spaceAfter=0),
        "banner": ParagraphStyle("banner", parent=base, fontName=_SANS + "-Bold", fontSize=19, leading=23,
                                 spaceAfter=3),
        "bannertext": ParagraphStyle("bannertext", parent=base, fontSize=10.5, leading=13.5, spaceAfter=0),
    }


def _e(value: Any) -> str:
    return escape(str(value))


def _p(value: float) -> str:
    return f"{value:.3g}"


# --- the plain-language page ----------------------------------------------------------------


def _page_one(report: Report, st: dict[str, Any], width: float) -> list[Any]:
    from reportlab.lib.colors import HexColor
    from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

    from cdi.report import figures
    from cdi.report.explain import explain

    label, dark, light = _VERDICT_STYLE[report.verdict]
    text = explain(report)
    flow: list[Any] = [
        Paragraph("CDI audit report", st["title"]),
        Paragraph("Was this diffusion model trained on these images?", st["subtitle"]),
    ]
    banner = Table([[Paragraph(f'<font color="{dark}">Verdict: {label}</font>', st["banner"])],
                    [Paragraph(text.headline, st["bannertext"])]], colWidths=[width])
    banner.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, -1), HexColor(light)), ("BOX", (0, 0), (-1, -1), 1.5, HexColor(dark)),
        ("LEFTPADDING", (0, 0), (-1, -1), 10), ("TOPPADDING", (0, 0), (-1, 0), 8),
        ("BOTTOMPADDING", (0, -1), (-1, -1), 9),
    ]))
    flow += [banner, Spacer(1, 8)]
    flow.append(Paragraph(text.p_value, st["body"]))
    flow.append(_image(figures.p_value_scale(report), 5.6 * 72))

    flow.append(Paragraph("What was tested", st["h2"]))
    flow += [Paragraph(line, st["body"]) for line in text.tested]
    flow += [Paragraph("What this means", st["h2"]), Paragraph(text.means, st["body"]),
             Paragraph("What this does not mean", st["h2"]), Paragraph(text.not_means, st["body"])]
    if report.planning is not None:
        flow += [Paragraph("How many images would detect it", st["h2"]),
                 Paragraph(_e(report.planning.summary), st["body"])]

    if report.sequential is not None:
        flow += _sequential(report, st, width)

    flow.append(Paragraph("Checks on the data (controls)", st["h2"]))
    rows = [[Paragraph(f"<b>{c.name}</b>", st["cell"]),
             Paragraph(f"<b>{c.outcome}</b>", st["cell"]), Paragraph(c.text, st["cell"])]
            for c in text.controls]
    table = Table(rows, colWidths=[0.2 * width, 0.14 * width, 0.66 * width])
    styles = [("VALIGN", (0, 0), (-1, -1), "TOP"), ("LINEBELOW", (0, 0), (-1, -2), 0.4, HexColor("#cccccc")),
              ("LEFTPADDING", (0, 0), (-1, -1), 3), ("TOPPADDING", (0, 0), (-1, -1), 3)]
    for i, c in enumerate(text.controls):
        if c.failed:
            styles.append(("TEXTCOLOR", (1, i), (1, i), HexColor("#922b21")))
    table.setStyle(TableStyle(styles))
    flow.append(table)
    for w in text.warnings:
        flow.append(Paragraph(f"<i>Note:</i> {w}", st["small"]))

    flow.append(Paragraph("How to check this report", st["h2"]))
    flow.append(Paragraph(text.check, st["small"]))
    return flow


def _sequential(report: Report, st: dict[str, Any], width: float) -> list[Any]:
    """A sequential audit's looks: images tested, boundary, p-value, what each decided."""
    from reportlab.lib.colors import HexColor
    from reportlab.platypus import Paragraph, Table, TableStyle

    seq = report.sequential
    assert seq is not None
    used = report.test.n_p + report.test.n_u
    total = seq.submitted_p + seq.submitted_u
    why = {"boundary": "a look crossed its boundary and its controls passed",
           "futility": "P did not lean towards used (futility)", "final": "the last look was reached"}[seq.stop]
    text = (f"The images were extracted and tested in rounds ({seq.spending} α-spending, at most "
            f"{len(seq.planned)} looks); each look's boundary is its share of α = {report.alpha}, and the shares "
            f"sum to α, so the chance of a false detection stays at most α however the audit stopped. It stopped "
            f"after look {len(seq.looks)} because {why}: {used} of {total} images were used; "
            f"{len(seq.unused)} were never run through the model.")
    head = ["look", "P + U tested", "boundary", "p-value", "outcome"]
    rows = [[Paragraph(f"<b>{h}</b>", st["cell"]) for h in head]]
    for k, lk in enumerate(seq.looks):
        outcome = ("crossed" + ("" if lk.controls_passed else ", controls failed") if lk.crossed
                   else "futile" if lk.futile else "continue")
        rows.append([Paragraph(_e(v), st["cell"]) for v in
                     (k + 1, f"{lk.n_p} + {lk.n_u}", _p(lk.level), _p(lk.test.p_value), outcome)])
    table = Table(rows, colWidths=[0.1 * width, 0.22 * width, 0.2 * width, 0.2 * width, 0.28 * width])
    table.setStyle(TableStyle([("LINEBELOW", (0, 0), (-1, -2), 0.4, HexColor("#cccccc")),
                               ("LEFTPADDING", (0, 0), (-1, -1), 3), ("TOPPADDING", (0, 0), (-1, -1), 2)]))
    return [Paragraph("Sequential audit", st["h2"]), Paragraph(_e(text), st["body"]), table]


# --- statistics and figures -----------------------------------------------------------------


def _kv_table(rows: Sequence[tuple[str, Any]], st: dict[str, Any], width: float, key_share: float = 0.3,
              mono_values: bool = False) -> Any:
    from reportlab.lib.colors import HexColor
    from reportlab.platypus import Paragraph, Table, TableStyle

    value_style = st["mono"] if mono_values else st["cell"]
    data = [[Paragraph(_e(k), st["cellbold"]), Paragraph(_e(v), value_style)] for k, v in rows]
    table = Table(data, colWidths=[key_share * width, (1 - key_share) * width], repeatRows=0)
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"), ("LINEBELOW", (0, 0), (-1, -1), 0.3, HexColor("#dddddd")),
        ("LEFTPADDING", (0, 0), (-1, -1), 3), ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]))
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _image(png: bytes, width: float) -> Any:
    from reportlab.lib.utils import ImageReader
    from reportlab.platypus import Image

    w, h = ImageReader(io.BytesIO(png)).getSize()
    return Image(io.BytesIO(png), width=width, height=width * h / w)


def _figure(png: bytes, width: float, caption: str, st: dict[str, Any]) -> list[Any]:
    from reportlab.platypus import Paragraph

    return [_image(png, width), Paragraph(caption, st["caption"])]


def _single_size(curve: SubsamplingCurve) -> str:
    if len(curve.sizes_p) > 1:
        return ""
    return (" The sets hold the fewest images the protocol accepts, so only their full size is shown: its "
            "spread comes from the protocol's random splits alone.")


def _direction_text(report: Report) -> str:
    dc = report.controls.direction_check
    if dc.p_value is None:
        return "not run"
    return f"{_p(dc.p_value)}, {'FAILED' if dc.failed else 'passed'}"


def _statistics(report: Report, curve: SubsamplingCurve, st: dict[str, Any], width: float) -> list[Any]:
    """Sections 1 to 5: the test, the p-value curve, the controls, the calibrated test and the shift control."""
    from reportlab.platypus import PageBreak, Paragraph

    from cdi.report import figures

    t = report.test
    flow: list[Any] = [PageBreak(), Paragraph("1. The test", st["h1"])]
    flow.append(Paragraph(_test_method(report), st["body"]))
    flow.append(_kv_table(_test_rows(report), st, width, key_share=0.42))
    flow.append(Paragraph("Why this verdict", st["h2"]))
    flow.append(Paragraph(_e(report.reason), st["body"]))
    flow += _figure(figures.score_distributions(report), width,
                    "<b>Figure 1. Score distributions.</b> The scores of the published (P) and unpublished (U) "
                    "images that entered the test, with their means (dashed) and every image as a tick below. "
                    "A model trained on P scores P higher: the red distribution lies to the right. Here "
                    f"{_e(score_meaning(t.protocol, t.selected_feature))}.", st)

    flow += _curve_section(report, curve, st, width)
    flow += _control_sections(report, st, width)
    flow += _shift_section(report, st, width)
    return flow


def _test_method(report: Report) -> str:
    """Section 1's paragraph: what the features are and how the audit's protocol tests them."""
    t = report.test
    if t.protocol == "directional":
        method = (
            f"Each image is described by {len(report.feature_layout.used)} numbers measuring how well the model "
            f"reconstructs it (the CDI features). Models reconstruct their training images better, so each "
            f"reconstruction error is expected to be lower for P if the model was trained on P. Directional "
            f"protocol: for every such feature, Welch's t compares P with U; the test statistic is the largest "
            f"of them (here {_e(t.selected_feature or '')}), and an image's score is its standardised value of "
            f"that feature, sign reversed. The p-value comes from random permutations of the P/U labels, each "
            f"recomputing every feature's t and taking the largest again, so the choice of the feature is "
            f"accounted for; permutations were drawn until {t.exceedances} of them reached the observed "
            f"statistic or {t.max_permutations:,} had been drawn ({t.n_permutations:,} drawn). The p-value is "
            f"exact under the null hypothesis, and its smallest possible value is {_fmt(t.p_value_floor)}.")
    else:
        protocol = (
            f"Reference protocol: each set split at random, {t.fit_fraction or 0:.0%} of it fitting the "
            f"scoring model and the rest scored; Welch's t-test (one-sided) on the scores."
            if t.protocol == "reference" else
            f"Cross-fitted protocol: {t.n_folds} folds, each image scored by a model fitted on the other folds; "
            f"the p-value from {t.n_permutations} permutations of the P/U labels, each rerunning the whole "
            f"procedure (exact under the null hypothesis).")
        method = (
            f"Each image is described by {len(report.feature_layout.used)} numbers measuring how well the model "
            f"reconstructs it (the CDI features). A scoring model (logistic regression) turns them into one "
            f"score per image ({_e(score_meaning(t.protocol))}), and the test asks whether P's scores are "
            f"higher than U's. {protocol}")
    return method


def _test_rows(report: Report) -> list[tuple[str, Any]]:
    """Section 1's table: the test's numbers (and the calibrated test's, where it ran)."""
    t = report.test
    rows = [
        ("verdict", report.verdict), ("one-sided p-value (H1: P scores higher)", _fmt(t.p_value)),
        ("threshold α", _fmt(t.alpha)), ("statistic", f"Welch t = {_fmt(t.statistic)}"),
        ("degrees of freedom", _fmt(t.df) if t.df is not None else "— (permutation test)"),
        ("direction", t.direction), ("AUC of the scores, P vs U", _fmt(t.auc)),
        ("Cohen's d of the scores", _fmt(t.cohens_d)),
        ("mean score, P / U", f"{_fmt(t.mean_score_p)} / {_fmt(t.mean_score_u)}"),
        ("images, P / U", f"{t.n_p} / {t.n_u}"),
        ("fitted on, P / U", f"{t.n_fit_p} / {t.n_fit_u}"), ("tested, P / U", f"{t.n_test_p} / {t.n_test_u}"),
        ("protocol", t.protocol), ("seed of the test", t.random_state),
    ]
    if report.calibrated_test is not None:
        rows += [("difficulty-calibrated test: p-value", _fmt(report.calibrated_test.p_value)),
                 ("verdict's p-value (the larger)", _fmt(report.p_value))]
    if t.protocol == "directional":
        rows += [("selected feature", t.selected_feature or "—"),
                 ("permutations drawn / at most", f"{t.n_permutations:,} / {t.max_permutations:,}"),
                 ("permuted statistics ≥ observed", t.exceedances)]
    return rows


def _curve_section(report: Report, curve: SubsamplingCurve, st: dict[str, Any], width: float) -> list[Any]:
    """Section 2: the p-value against the number of images."""
    from reportlab.platypus import PageBreak, Paragraph

    from cdi.report import figures

    t = report.test
    flow: list[Any] = []
    flow += [PageBreak(), Paragraph("2. How the p-value depends on the number of images", st["h1"])]
    perms = (f" Each test here drew at most {curve.n_permutations} permutations (the audit: "
             f"{t.n_permutations}), so no p-value falls below {1 / (1 + (curve.n_permutations or 1)):.3g}."
             if curve.n_permutations else "")
    flow += _figure(figures.subsampling(report, curve), width,
                    f"<b>Figure 2. p-value against the number of images.</b> For each size, {curve.draws} random "
                    f"subsamples of P and U (U in proportion) were audited again from the report's features: "
                    f"the line is the median p-value, the band holds 80 % of them, and the bars give the share "
                    f"below α = {curve.alpha:g} (an estimate of the test's power at that size). The star is this "
                    f"audit.{perms} A curve that falls with the number of images and crosses α well before the "
                    f"full size indicates a robust detection; one that stays high says that more images would "
                    f"not likely change a \u201cnot detected\u201d.{_single_size(curve)} Seed {curve.random_state}; "
                    f"an illustration derived from the report, not part of the evidence.", st)
    return flow


def _control_sections(report: Report, st: dict[str, Any], width: float) -> list[Any]:
    """Sections 3 and 4: the negative control, the direction check and the distribution check."""
    from reportlab.platypus import KeepTogether, Paragraph

    from cdi.report import figures

    nc = report.controls.negative_control
    d = report.controls.distribution_check
    flow: list[Any] = []
    section: list[Any] = [Paragraph("3. Negative control and direction check", st["h1"])]
    section.append(Paragraph(
        f"The unpublished images were split at random into two halves (seed {nc.split_random_state}), one "
        f"playing P, and the same test was run on them. The model cannot have been trained on either half more "
        f"than the other, so this p-value should look like a uniform random number: a significant one means "
        f"the test's assumptions do not hold on these data. The direction check asks the opposite question "
        f"with a fixed index of the loss-type features ({', '.join(report.controls.direction_check.features)}), "
        f"lower for training images: a significant p-value means P looks <i>less</i> like training data "
        f"than U (swapped sets, or training images among U).", st["body"]))
    section += _figure(figures.negative_control(report), width,
                    f"<b>Figure 3. Negative control.</b> Left: the scores of the two halves of U in the control "
                    f"test. Right: where the p-values of the audit's test ({_p(report.p_value)}), of the "
                    f"negative control ({_p(nc.p_value)}, {'FAILED' if nc.significant else 'passed'}) and of "
                    f"the direction check ({_direction_text(report)}) fall against α = {report.alpha:g}.", st)
    flow.append(KeepTogether(section))

    section = [Paragraph("4. Distribution check", st["h1"])]
    section.append(Paragraph(
        f"A detection could come from P and U differing as images (source, format, processing) rather than "
        f"from training. A classifier that never sees the model tries to tell P from U using "
        f"{len(d.statistic_names)} simple image statistics, cross-validated over {d.n_folds} folds, its AUC "
        f"tested with {d.n_permutations} permutations. The check fails when p &lt; "
        f"{report.decision.alpha_control:g} and AUC ≥ {report.decision.auc_threshold:g} while the test fires: "
        f"a difference the test did not pick up (a colour cast, a size) cannot have made P look used, and is "
        f"only reported.", st["body"]))
    outcome = "FAILED: the sets differ" if d.shift else ("passed with a warning" if d.warning else "passed")
    section += _figure(figures.distribution_check(report), width,
                       f"<b>Figure 4. Distribution check</b> ({outcome}). Left: the classifier's AUC (0.5 is "
                       f"chance) against the threshold. Right: the image statistics that differ most between P "
                       f"and U, by Cohen's d (only those with |d| ≥ 0.2).", st)
    flow.append(KeepTogether(section))
    return flow


def _shift_section(report: Report, st: dict[str, Any], width: float) -> list[Any]:
    """Section 5: the difficulty-calibrated test and the shift control (absent from older reports)."""
    from reportlab.platypus import KeepTogether, Paragraph

    sc, cal = report.controls.shift_control, report.calibrated_test
    if sc is None and cal is None:
        return []
    section: list[Any] = [Paragraph("5. Image difficulty: calibrated test and shift control", st["h1"])]
    section.append(Paragraph(
        "Darker, flatter or simpler images are easier for any diffusion model, trained on them or not. Each "
        "image is summarised by a few numbers that ignore the model (brightness, contrast, edge energy, shares "
        "of deep shadow and bright highlight, colourfulness, compressed bytes per pixel) and by the "
        "layout of light and dark (a 3 × 3 grid). The calibrated test reruns the test on what these "
        "numbers cannot explain of each image's loss (a fit on the unpublished images, refitted for every "
        "permutation of the labels, so its p-value stays exact); “used” needs both "
        "tests below α. The shift control asks whether the way P and U differ in these numbers by itself "
        "predicts lower losses for P; if it does while the test fires, the audit is inconclusive.", st["body"]))
    rows: list[tuple[str, Any]] = []
    if cal is not None:
        rows.append(("calibrated test: p-value / statistic", f"{_fmt(cal.p_value)} / {_fmt(cal.statistic)}"))
    if sc is not None:
        state = "FAILED" if sc.failed else ("warning" if sc.p_value < sc.alpha_shift else "passed")
        rows += [("shift control: p-value / level", f"{_fmt(sc.p_value)} / {_fmt(sc.alpha_shift)} ({state})"),
                 ("how P and U differ", sc.words)]
        rows += [(f"{d.name}: P / U (d)", f"{_fmt(d.mean_p)} / {_fmt(d.mean_u)} ({d.cohens_d:+.2f})")
                 for d in sc.differences[:4]]
        if sc.failed:
            rows.append(("what would fix it", sc.fix))
    section.append(_kv_table(rows, st, width, key_share=0.42))
    return [KeepTogether(section)]


# --- appendix ------------------------------------------------------------------------------


def _appendix(report: Report, curve: SubsamplingCurve, st: dict[str, Any], width: float) -> list[Any]:
    """Appendices A (the manifest) to D (integrity)."""
    return _manifest_appendix(report, curve, st, width) + _records_appendix(report, st, width)


def _manifest_appendix(report: Report, curve: SubsamplingCurve, st: dict[str, Any], width: float) -> list[Any]:
    """Appendix A: the model, features, protocol, seeds and software: everything to rerun the audit."""
    from reportlab.platypus import PageBreak, Paragraph

    m = report.manifest
    flow: list[Any] = [PageBreak(), Paragraph("Appendix A. Manifest: everything needed to rerun the audit",
                                              st["h1"])]
    flow.append(Paragraph("Model", st["h2"]))
    model_rows: list[tuple[str, Any]] = [
        ("source", m.model.source), ("revision", m.model.revision or "—"), ("family", m.model.family),
        ("conditioning", m.model.conditioning),
        ("input", f"{m.model.image_channels} channel(s), {m.model.image_size}×{m.model.image_size}"),
        ("training timesteps", m.model.num_train_timesteps),
        ("device / dtype", f"{m.model.device} / {m.model.dtype}"),
    ]
    if m.model.noise_schedule is not None:
        model_rows.append(("noise schedule / prediction", f"{m.model.noise_schedule} / {m.model.prediction_type}"))
    if m.model.flow_sigmas:
        grid = sorted(m.model.flow_sigmas.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)
        model_rows.append(("σ at each timestep t", ", ".join(f"{t}: {sigma:.4f}" for t, sigma in grid)))
    model_rows += [(k, _fmt(v)) for k, v in sorted(m.model.details.items())]
    flow.append(_kv_table(model_rows, st, width))
    flow.append(Paragraph("Model identity and weight files (SHA-256)", st["h2"]))
    flow.append(_kv_table([("model digest", m.model.digest), *sorted(m.model.weight_sha256.items())], st, width,
                          key_share=0.42, mono_values=True))
    flow.append(Paragraph("Features", st["h2"]))
    layout = report.feature_layout
    cfg = m.options.feature_config
    flow.append(_kv_table([
        ("layout version", layout.version), ("feature set", m.options.features),
        *((("features computed", f"{len(layout.computed)} of {len(layout.names)}: {', '.join(layout.computed)}; "
            "the others were not computed (empty in the JSON report), not missing values"),)
          if layout.computed is not None and len(layout.computed) < len(layout.names) else ()),
        ("features used", f"{len(layout.used)} of {len(layout.names)}: {', '.join(layout.used)}"),
        *((f"parameter {k}", _fmt(v)) for k, v in sorted(cfg.items())),
        ("feature store key", m.feature_key),
    ], st, width))
    flow.append(Paragraph("Protocol and decision", st["h2"]))
    o, dec = m.options, report.decision
    flow.append(_kv_table([
        ("protocol", o.protocol), ("α", _fmt(o.alpha)), ("fit fraction (reference)", _fmt(o.fit_fraction)),
        ("folds (crossfit)", o.n_folds), ("permutations (crossfit)", o.n_permutations),
        ("duplicate threshold (aligned RMS difference, levels of 255)", _fmt(o.duplicate_threshold)),
        ("decision rule", dec.rule), ("distribution check α", _fmt(dec.alpha_control)),
        ("distribution check AUC threshold", _fmt(dec.auc_threshold)),
        ("batch size", o.batch_size), ("device / dtype", f"{o.device} / {o.dtype}"),
    ], st, width))
    flow.append(Paragraph("Seeds", st["h2"]))
    s = m.seeds
    flow.append(_kv_table([
        ("audit (options.seed; also the features' noise)", s.audit), ("test", s.test),
        ("negative control: split of U", s.negative_control_split),
        ("negative control: test", s.negative_control_test), ("distribution check", s.distribution_check),
        ("Figure 2 (subsampling curve)", curve.random_state),
    ], st, width, key_share=0.5))
    flow.append(Paragraph("Software, device, time and work", st["h2"]))
    flow.append(_kv_table([
        *sorted(m.versions.items()), ("device", m.device),
        *((f"time: {k}", f"{v:.2f} s") for k, v in m.timings_seconds.items()),
        ("forward passes", m.passes.forward), ("backward passes", m.passes.backward),
        ("images with stored features", m.passes.cached_images),
    ], st, width))
    return flow


def _records_appendix(report: Report, st: dict[str, Any], width: float) -> list[Any]:
    """Appendices B (duplicates, exclusions, warnings), C (the images) and D (integrity)."""
    from reportlab.platypus import PageBreak, Paragraph

    flow: list[Any] = [Paragraph("Appendix B. Duplicates and exclusions", st["h1"])]
    ex = report.controls.excluded
    dups = report.controls.duplicates
    if not dups.groups:
        flow.append(Paragraph(f"No duplicates (exact SHA-256, or thumbnails that differ by at most "
                              f"{_fmt(dups.difference_threshold)} levels once a light crop is undone).",
                              st["body"]))
    for reason in ex.reasons:
        flow.append(Paragraph(_e(reason), st["small"]))
    if report.warnings:
        flow.append(Paragraph("Warnings", st["h2"]))
        flow += [Paragraph(_e(w), st["small"]) for w in report.warnings]

    flow += [PageBreak(), Paragraph("Appendix C. The audited images", st["h1"])]
    flow += _image_table(report, st, width)

    flow += [Paragraph("Appendix D. Integrity", st["h1"])]
    integ = report.integrity
    rows: list[tuple[str, Any]] = [("schema", report.schema_version)]
    if integ is None:
        rows.append(("digest", "none: this report is not sealed"))
    else:
        rows += [("canonical form", integ.canonicalization), ("digest (SHA-256)", integ.digest)]
        if integ.signature:
            rows += [("signature", f"Ed25519, key id {integ.signature.key_id}"),
                     ("public key (base64)", integ.signature.public_key),
                     ("signature value (base64)", integ.signature.value)]
        else:
            rows.append(("signature", "none"))
    flow.append(_kv_table(rows, st, width, key_share=0.25, mono_values=True))
    flow.append(Paragraph(
        "The digest is SHA-256 of the JSON report in RFC 8785 canonical form (keys sorted, no whitespace, "
        "UTF-8, shortest round-trip numbers) without its <i>integrity</i> and <i>service</i> members. A "
        "signature signs the ASCII text \u201ccdi-report/1 sha256:\u201d followed by the digest.", st["small"]))
    return flow


def _image_table(report: Report, st: dict[str, Any], width: float) -> list[Any]:
    from reportlab.lib.colors import HexColor
    from reportlab.platypus import Paragraph, Table, TableStyle

    shown = report.images[:MAX_IMAGE_ROWS]
    t = report.test
    fitted = " (— for images that only fitted the scoring model)" if t.protocol == "reference" else ""
    intro = (f"{len(report.images)} images, P first. Score: {_e(score_meaning(t.protocol, t.selected_feature))}"
             f"{fitted}.")
    if len(shown) < len(report.images):
        intro += f" The first {len(shown)} are listed; the JSON report holds all of them with their features."
    header = ["set", "#", "file", "role", "score", "SHA-256 of the file"]
    data: list[list[Any]] = [[Paragraph(f"<b>{h}</b>", st["cell"]) for h in header]]
    for r in shown:
        role = r.role if r.fold is None else f"{r.role}, fold {r.fold}"
        data.append([r.set, str(r.index), Paragraph(_e(r.name), st["cell"]), role,
                     "—" if r.score is None else f"{r.score:.4f}", r.sha256])
    table = Table(data, colWidths=[w * width for w in (0.045, 0.055, 0.18, 0.12, 0.08, 0.52)], repeatRows=1)
    table.setStyle(TableStyle([
        ("FONT", (0, 1), (4, -1), _SANS, 7.5), ("FONT", (5, 1), (5, -1), _MONO, 6.2),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"), ("LINEBELOW", (0, 0), (-1, 0), 0.6, HexColor("#888888")),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [HexColor("#ffffff"), HexColor("#f4f6f7")]),
        ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
        ("LEFTPADDING", (0, 0), (-1, -1), 2), ("RIGHTPADDING", (0, 0), (-1, -1), 2),
    ]))
    return [Paragraph(intro, st["small"]), table]


# --- document -----------------------------------------------------------------------------


def _decorate(report: Report) -> Callable[[Any, int], None]:
    from reportlab.lib.colors import HexColor
    from reportlab.lib.pagesizes import A4

    page_w, _ = A4
    digest = report.digest
    footer = (f"Report digest (SHA-256): {digest}" if digest else "UNSEALED REPORT: no digest")
    label = _VERDICT_STYLE[report.verdict][0]

    def draw(canvas: Any, total: int) -> None:
        page = canvas.getPageNumber()
        canvas.saveState()
        canvas.setStrokeColor(HexColor("#bbbbbb"))
        canvas.line(45, 40, page_w - 45, 40)
        canvas.setFont(_MONO, 6.6)
        canvas.setFillColor(HexColor("#333333"))
        canvas.drawString(45, 30, footer)
        canvas.setFont(_SANS, 7)
        canvas.drawRightString(page_w - 45, 30, f"page {page} of {total}")
        if page > 1:
            canvas.setFont(_SANS, 7)
            canvas.setFillColor(HexColor("#666666"))
            canvas.drawString(45, A4[1] - 30, f"CDI audit report — verdict {label}, p = {_p(report.p_value)} — "
                                              f"model {report.manifest.model.source}"[:150])
        canvas.restoreState()

    return draw


def _pdf_date(when: datetime) -> str:
    """A PDF date string (``D:YYYYMMDDHHmmSS+00'00'``) of ``when``, in UTC."""
    utc = when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return utc.strftime("D:%Y%m%d%H%M%S+00'00'")


def _canvas_maker(draw: Callable[[Any, int], None], created: datetime | None = None) -> type:
    from reportlab.pdfgen.canvas import Canvas

    class NumberedCanvas(Canvas):  # type: ignore[misc]  # reportlab ships no type hints
        """Keeps every page until the end, to write "page n of N" on each."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []
            if created is not None:
                # The document is built invariant (the same report gives the same bytes), which
                # would date it 2000-01-01: its creation and modification dates are the report's.
                stamp = _pdf_date(created)
                self._doc.setDateFormatter(lambda *_ymdhms: stamp)

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                draw(self, total)
                super().showPage()
            super().save()

    return NumberedCanvas


def render_pdf(
    report: Report,
    *,
    curve: SubsamplingCurve | None = None,
    curve_draws: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> bytes:
    """The PDF of ``report`` (a sealed report shows its digest on every page).

    ``curve``: the subsampling curve of Figure 2, computed here when not given (with
    ``curve_draws`` subsamples per size; ``progress(done, total)`` follows it).
    """
    from reportlab.lib.pagesizes import A4
    from reportlab.platypus import Frame, PageTemplate
    from reportlab.platypus.doctemplate import BaseDocTemplate

    from cdi.report.curve import subsampling_curve

    _fonts()
    if curve is None:
        curve = subsampling_curve(report, draws=curve_draws, progress=progress)
    st = _styles()
    buf = io.BytesIO()
    margin = 50.0
    doc = BaseDocTemplate(
        buf, pagesize=A4, leftMargin=margin, rightMargin=margin, topMargin=45, bottomMargin=55,
        title=f"CDI audit report: {_VERDICT_STYLE[report.verdict][0]}", author="cdi-audit",
        subject=f"sha256:{report.digest}" if report.digest else "unsealed CDI report",
        creator=f"cdi-audit {report.manifest.versions.get('cdi-audit', '')}".strip(), invariant=1,
    )
    frame = Frame(doc.leftMargin, doc.bottomMargin, doc.width, doc.height, id="body", leftPadding=0,
                  rightPadding=0, topPadding=0, bottomPadding=0)
    doc.addPageTemplates([PageTemplate(id="page", frames=[frame])])
    width = doc.width
    story = _page_one(report, st, width) + _statistics(report, curve, st, width) + _appendix(report, curve, st, width)
    doc.build(story, canvasmaker=_canvas_maker(_decorate(report), report.created_at))
    return buf.getvalue()
