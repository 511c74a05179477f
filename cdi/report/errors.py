"""Errors of the report package, in the library's hierarchy (:mod:`cdi.errors`)."""

from __future__ import annotations

from cdi.errors import CdiError

__all__ = ["ReportError", "ReportFormatError", "SigningKeyError"]


class ReportError(CdiError):
    """A report that cannot be read, built or rendered."""

    code = "report_error"


class ReportFormatError(ReportError):
    """A document that is not a valid report of a known schema version."""

    code = "report_invalid"


class SigningKeyError(ReportError):
    """A signing or verification key that cannot be read."""

    code = "signing_key_invalid"
