"""Captions and class labels: reading the per-image conditioning files safely.

A file maps image file names to a caption (text models) or a class label (class-conditional
models). Two formats are accepted:

- CSV with a header row naming ``file`` and ``caption`` (or ``label``) columns;
- JSON Lines, one object per line: ``{"file": "a.png", "caption": "..."}``.

Everything is checked: size, encoding, duplicate names, caption length, integer labels.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Literal

from cdi.errors import InputError

Kind = Literal["caption", "label"]

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_CAPTION_CHARS = 2000


def parse_conditions(data: bytes, kind: Kind, source: str = "conditions file") -> dict[str, str | int]:
    """Parse a captions or labels file's bytes into ``{file name: caption or label}``."""
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{source} is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{source} is not UTF-8 text") from None
    if "\x00" in text:
        raise InputError(f"{source} contains NUL bytes")
    stripped = text.lstrip()
    rows = _parse_jsonl(text, kind, source) if stripped.startswith("{") else _parse_csv(text, kind, source)
    out: dict[str, str | int] = {}
    for line, name, value in rows:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise InputError(f"{source}, line {line}: {name!r} is not a plain file name")
        if name in out:
            raise InputError(f"{source}, line {line}: {name} appears twice")
        out[name] = _check_value(value, kind, f"{source}, line {line}")
    return out


def read_conditions(path: str | Path, kind: Kind) -> dict[str, str | int]:
    p = Path(path)
    if p.stat().st_size > MAX_FILE_BYTES:
        raise InputError(f"{p.name} is larger than {MAX_FILE_BYTES} bytes")
    return parse_conditions(p.read_bytes(), kind, p.name)


def _parse_jsonl(text: str, kind: Kind, source: str) -> list[tuple[int, str, object]]:
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}, line {i}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "file" not in obj or kind not in obj:
            raise InputError(f'{source}, line {i}: expected an object with "file" and "{kind}"')
        if not isinstance(obj["file"], str):
            raise InputError(f'{source}, line {i}: "file" must be a string')
        rows.append((i, obj["file"], obj[kind]))
    return rows


def _parse_csv(text: str, kind: Kind, source: str) -> list[tuple[int, str, object]]:
    try:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise InputError(f"{source} is empty")
        names = [h.strip().lower() for h in header]
        if "file" not in names or kind not in names:
            raise InputError(f"{source}: the CSV header must name the columns 'file' and '{kind}'")
        fi, ki = names.index("file"), names.index(kind)
        rows: list[tuple[int, str, object]] = []
        for i, rec in enumerate(reader, start=2):
            if not rec:
                continue
            if len(rec) != len(names):
                raise InputError(f"{source}, line {i}: {len(rec)} fields, expected {len(names)}")
            rows.append((i, rec[fi].strip(), rec[ki]))
        return rows
    except csv.Error as exc:
        raise InputError(f"{source}: malformed CSV ({exc})") from None


def _check_value(value: object, kind: Kind, where: str) -> str | int:
    if kind == "caption":
        if not isinstance(value, str):
            raise InputError(f"{where}: a caption must be text")
        if len(value) > MAX_CAPTION_CHARS:
            raise InputError(f"{where}: caption longer than {MAX_CAPTION_CHARS} characters")
        if any(ord(c) < 32 and c not in "\t\n" for c in value):
            raise InputError(f"{where}: caption contains control characters")
        return value
    if isinstance(value, bool):
        raise InputError(f"{where}: a label must be an integer")
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
        label = int(value.strip())
    else:
        raise InputError(f"{where}: a label must be an integer, got {value!r}")
    if not 0 <= label < 1_000_000:
        raise InputError(f"{where}: label {label} out of range")
    return label
