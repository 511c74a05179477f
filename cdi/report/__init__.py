"""The audit report: versioned JSON (schema ``cdi-report/1``), its integrity, and its PDF.

Typical use::

    from cdi.report import build_report, seal, render_pdf

    report = seal(build_report(result), signing_key)   # digest (+ signature)
    Path("report.json").write_text(report_json(report))
    Path("report.pdf").write_bytes(render_pdf(report))

and to check a report received from someone else: :func:`verify_document` (digest, signature,
schema) and :func:`recompute_document` (the test rerun from the report alone).

Importing this package loads pydantic and numpy only; cryptography, matplotlib, reportlab
and the statistics are imported by the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdi.report.canonical import canonical_json, content_digest
from cdi.report.curve import SubsamplingCurve, subsampling_curve
from cdi.report.errors import ReportError, ReportFormatError, SigningKeyError
from cdi.report.integrity import (
    SIGNING_KEY_ENV,
    Verification,
    load_private_key,
    load_public_key,
    seal,
    seal_document,
    signing_key_from_env,
    verify_document,
)
from cdi.report.model import SCHEMA_ID, SCHEMA_VERSION, Report, build_report, json_schema, parse_report
from cdi.report.pdf import render_pdf
from cdi.report.recompute import Recomputation, plan_from_report, recompute_document, recompute_report

if TYPE_CHECKING:
    from cdi.audit import AuditResult

__all__ = [
    "SCHEMA_ID",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "SIGNING_KEY_ENV",
    "Recomputation",
    "Report",
    "ReportError",
    "ReportFormatError",
    "SigningKeyError",
    "SubsamplingCurve",
    "Verification",
    "build_report",
    "canonical_json",
    "content_digest",
    "json_schema",
    "load_private_key",
    "load_public_key",
    "parse_report",
    "plan_from_report",
    "read_document",
    "recompute_document",
    "recompute_report",
    "render_pdf",
    "report_json",
    "result_to_dict",
    "schema_json",
    "seal",
    "seal_document",
    "signing_key_from_env",
    "subsampling_curve",
    "verify_document",
]

#: The published JSON Schema of the current report version.
SCHEMA_PATH = Path(__file__).parent / "schema" / "cdi-report-1.schema.json"


def report_json(report: Report) -> str:
    """The report as the JSON text written to files: indented, UTF-8, numbers that read back exactly."""
    return json.dumps(report.to_document(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def result_to_dict(result: AuditResult) -> dict[str, Any]:
    """An audit's sealed report as JSON data: schema ``cdi-report/1``, unsigned.

    ``verdict`` and ``p_value`` are at the top level; ``integrity.digest`` seals the rest.
    """
    return seal(build_report(result)).to_document()


def schema_json() -> str:
    """The JSON Schema as the text of :data:`SCHEMA_PATH` (regenerate with ``python -m cdi.report``)."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def read_document(path: str | Path) -> Any:
    """A report file's JSON data; raises :class:`ReportFormatError` if it is not JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportFormatError(f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ReportFormatError(f"{p} is not UTF-8 text") from None

    def refuse(constant: str) -> Any:
        raise ReportFormatError(f"{p} holds {constant}, which is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise ReportFormatError(f"{p} is not JSON: {exc}") from None
