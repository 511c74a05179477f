"""The stand-in report PDF is a valid one-page PDF."""

from __future__ import annotations

import re

from app.pdf import render_report_pdf, simple_pdf


def test_structure_and_xref_offsets() -> None:
    data = simple_pdf("Title (with parens) \\ and ü", ["line one", "p-value: 0.001"])
    assert data.startswith(b"%PDF-1.4") and data.endswith(b"%%EOF\n")
    startxref = int(re.search(rb"startxref\n(\d+)\n", data).group(1))  # type: ignore[union-attr]
    assert data[startxref:].startswith(b"xref\n0 7\n")
    offsets = [int(m) for m in re.findall(rb"(\d{10}) 00000 n", data)]
    for i, off in enumerate(offsets, 1):
        assert data[off:].startswith(f"{i} 0 obj".encode())
    assert data.count(b"/Type /Page ") == 1
    assert b"\\(with parens\\)" in data


def test_report_pdf_names_the_verdict() -> None:
    pdf = render_report_pdf({"id": "a1", "model": "m", "options": {"alpha": 0.01}, "n_published": 10,
                             "n_unpublished": 20}, {"verdict": "used", "p_value": 0.0004})
    assert b"Verdict: used" in pdf and b"p-value: 0.0004" in pdf
