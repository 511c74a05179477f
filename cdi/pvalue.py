"""The one way a p-value is written for people: three significant digits, ``%.3g``.

``0.0123``, ``0.5``, ``1e-06`` (never ``9.99999000001e-07`` or ``0.000001``). The command line,
the report's text, the PDF and the service's command-line client write it so; the web page
writes it with the same rule (``formatP`` in ``app/web/static/app.js``). The JSON reports keep
the full number.
"""

from __future__ import annotations


def format_p_value(p: float | None) -> str:
    """``p`` for people (``"—"`` when there is none)."""
    if p is None:
        return "—"
    return f"{float(p):.3g}"


__all__ = ["format_p_value"]
