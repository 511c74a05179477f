"""The PDF of an audit's report.

:func:`render_report_pdf` renders a report of the library's schema (``cdi-report/1``) with
the library's renderer (:func:`cdi.report.render_pdf`): the same document as ``cdi audit
--pdf``, showing the JSON report's digest on every page.

Reports stored before reports had a schema, or a worker installed without the ``report``
extra (matplotlib, reportlab), get :func:`simple_pdf`: a one-page PDF of the verdict,
written by hand (no dependency), a valid PDF 1.4 file with built-in Helvetica and a correct
xref table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

_PAGE_W, _PAGE_H = 595, 842  # A4 in points


def _escape(text: str) -> str:
    text = text.encode("latin-1", "replace").decode("latin-1")
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def simple_pdf(title: str, lines: Sequence[str]) -> bytes:
    """A single-page PDF with a title and lines of text (long lists are cut to fit the page)."""
    ops = ["BT", "/F2 18 Tf", f"50 {_PAGE_H - 70} Td", f"({_escape(title)}) Tj", "ET"]
    y = _PAGE_H - 110
    for line in lines:
        if y < 50:
            break
        ops += ["BT", "/F1 11 Tf", f"50 {y} Td", f"({_escape(line[:95])}) Tj", "ET"]
        y -= 16
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {_PAGE_W} {_PAGE_H}] "
         "/Resources << /Font << /F1 4 0 R /F2 5 0 R >> >> /Contents 6 0 R >>").encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def verdict_lines(audit: Mapping[str, Any], report: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Audit: {audit.get('id')}",
        f"Model: {audit.get('model')}",
        f"Finished: {audit.get('finished_at')}",
        "",
        f"Verdict: {report.get('verdict')}",
        f"p-value: {_fmt(report.get('p_value'))}",
    ]
    for key in ("alpha", "protocol", "features", "seed"):
        if key in (audit.get("options") or {}):
            lines.append(f"{key}: {_fmt(audit['options'][key])}")
    lines += ["", f"Published images: {audit.get('n_published')}",
              f"Unpublished images: {audit.get('n_unpublished')}", ""]
    meaning = {
        "used": "The model was very likely trained on the published images (p < alpha, controls passed).",
        "not_detected": "No evidence of training on the published images was found (which is not "
                        "evidence of absence).",
        "inconclusive": "The controls failed: the data cannot support a verdict (see the JSON report).",
    }
    lines.append(meaning.get(str(report.get("verdict")), ""))
    lines += ["", "The full report, with everything needed to rerun the audit, is the JSON report."]
    return lines


def render_report_pdf(audit: Mapping[str, Any], report: Mapping[str, Any]) -> bytes:
    """The report's PDF: the library's full report for a ``cdi-report`` document, else one page.

    ``audit``: the service's facts about the audit (id, model, options, set sizes), shown
    only on the one-page fallback. Raises :class:`cdi.report.ReportFormatError` for a
    document that claims a schema but does not match it.
    """
    if report.get("schema_version") is None:
        return simple_pdf("CDI audit: verdict", verdict_lines(audit, report))
    from cdi.report import parse_report, render_pdf

    document = parse_report({k: v for k, v in report.items() if k != "service"})
    try:
        return render_pdf(document)
    except ModuleNotFoundError as exc:
        # A worker image without the report extra: still deliver a PDF, and say why it is short.
        log.warning("the report PDF needs the report extra (%s); writing the one-page PDF", exc.name)
        digest = document.digest or "none"
        return simple_pdf("CDI audit: verdict",
                          [*verdict_lines(audit, report), "", f"Report digest (SHA-256): {digest[:32]}",
                           f"    {digest[32:]}"])
