"""Canonical JSON of a report and its SHA-256 digest.

The digest must be recomputable by anyone, in any language, from the JSON file alone. The
canonical form is the JSON Canonicalization Scheme (RFC 8785, "JCS"), for which libraries
exist in most languages:

* objects with their members sorted by key (compared as UTF-16 code units), arrays in order;
* no whitespace; strings with only the mandatory escapes (``\\"``, ``\\\\``, control
  characters), everything else as UTF-8;
* numbers as ECMAScript prints an IEEE-754 double (``Number.prototype.toString``): the
  shortest digits that read back to the same double, ``1e-7`` and ``1e+21`` for very small and
  very large magnitudes, ``5`` for ``5.0``, ``0`` for ``-0``; NaN and infinities are not JSON
  and are refused (the report writes them as the strings ``"NaN"``, ``"Infinity"``);
* ``true``, ``false``, ``null``.

The digest of a report covers the whole document except two top-level members (fixed by the
schema version, never read from the document): ``integrity``, which holds the digest itself,
and ``service``, delivery metadata a service may attach (its audit id and timestamps).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from cdi.report.errors import ReportFormatError

__all__ = ["UNDIGESTED_MEMBERS", "canonical_json", "content_digest", "format_number"]

#: Top-level members of a report that its digest does not cover.
UNDIGESTED_MEMBERS: tuple[str, ...] = ("integrity", "service")

#: Integers beyond this lose precision as IEEE-754 doubles, which JCS numbers are.
_MAX_SAFE_INTEGER = 2**53 - 1


def format_number(value: float | int) -> str:
    """A number as JCS (ECMAScript ``Number.prototype.toString``) writes it."""
    if isinstance(value, bool):
        raise ReportFormatError("a boolean is not a number")
    if isinstance(value, int):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise ReportFormatError(f"the integer {value} is too large for a JSON number (IEEE-754 double)")
        return str(value)
    x = float(value)
    if not math.isfinite(x):
        raise ReportFormatError(f"{x} is not a JSON number")
    if x == 0.0:
        return "0"
    # repr() gives the shortest digits that round-trip (as ECMAScript requires); only the
    # layout differs, so take its digits and exponent and lay them out the ECMAScript way.
    sign = "-" if x < 0 else ""
    dec = Decimal(repr(abs(x))).normalize()
    _, digit_tuple, exponent = dec.as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(str(d) for d in digit_tuple)
    k = len(digits)
    n = k + exponent  # the value is 0.<digits> × 10^n
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        out = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _string(value: str) -> str:
    # json.dumps without ensure_ascii escapes exactly what JCS requires (", \, U+0000–U+001F,
    # the latter as \b \t \n \f \r or lowercase \u00xx) and nothing else.
    return json.dumps(value, ensure_ascii=False)


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int | float):
        out.append(format_number(value))
    elif isinstance(value, Mapping):
        keys = list(value)
        if any(not isinstance(k, str) for k in keys):
            raise ReportFormatError("a JSON object's keys must be strings")
        out.append("{")
        for i, key in enumerate(sorted(keys, key=lambda k: k.encode("utf-16-be"))):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise ReportFormatError(f"a {type(value).__name__} is not JSON data")


def canonical_json(value: Any) -> bytes:
    """``value`` (JSON data: dicts, lists, str, int, float, bool, None) as canonical UTF-8 bytes."""
    out: list[str] = []
    _write(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise ReportFormatError(f"a string is not valid Unicode: {exc}") from None


def content_digest(document: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``document`` without :data:`UNDIGESTED_MEMBERS`."""
    if not isinstance(document, Mapping):
        raise ReportFormatError("a report is a JSON object")
    body = {k: v for k, v in document.items() if k not in UNDIGESTED_MEMBERS}
    return hashlib.sha256(canonical_json(body)).hexdigest()
