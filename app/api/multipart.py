"""A streaming ``multipart/form-data`` reader with limits.

Starlette's form parser spools files without a size limit; this one writes each file part
to a temporary file as the bytes arrive, counts every byte of the body, and stops reading
as soon as a limit is passed, so an upload is never held whole in memory and an oversized
one costs at most the limit in disk space.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import MALFORMED_UPLOAD, UPLOAD_TOO_LARGE, BadInput, TooLarge
from app.spool import spool_prefix

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # declared for type checkers only

#: Largest plain (non-file) form field, bytes.
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 32


@dataclass
class UploadedFile:
    field: str
    filename: str
    path: Path
    size: int = 0


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def cleanup(self) -> None:
        for f in self.files.values():
            f.path.unlink(missing_ok=True)


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    buffer: bytearray = field(default_factory=bytearray)
    file: IO[bytes] | None = None
    upload: UploadedFile | None = None


class _FormReader:
    """The multipart parser's callbacks for one form: its parts, their headers, the first error.

    The state is the reader's own; :func:`read_form` feeds the parser and raises the first
    error recorded here (callbacks cannot raise through the parser).
    """

    def __init__(self, tmp_dir: Path, file_fields: frozenset[str], text_fields: frozenset[str],
                 file_limits: dict[str, tuple[int, str, str]]) -> None:
        self.tmp_dir = tmp_dir
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.file_limits = file_limits
        self.form = ParsedForm()
        self.current = _Part()
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.parts = 0
        self.errors: list[Exception] = []

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def fail(self, exc: Exception) -> None:
        if not self.errors:
            self.errors.append(exc)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]

    def abandon(self) -> None:
        """Close the part being written and remove every temporary file."""
        if self.current.file is not None:
            self.current.file.close()
        self.form.cleanup()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            self.fail(BadInput(f"more than {MAX_PARTS} form fields", MALFORMED_UPLOAD))
        self.current = _Part()
        self.headers.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value.extend(data[start:end])

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        disp, opts = parse_options_header(self.headers.get(b"content-disposition", b""))
        if disp != b"form-data" or b"name" not in opts:
            self.fail(BadInput("a form part lacks Content-Disposition: form-data; name=...", MALFORMED_UPLOAD))
            return
        name = opts[b"name"].decode("utf-8", "replace")
        self.current.name = name
        is_file = b"filename" in opts
        form, file_fields, text_fields = self.form, self.file_fields, self.text_fields
        if name in form.fields or name in form.files:
            self.fail(BadInput(f"form field {name!r} is given twice", MALFORMED_UPLOAD))
            return
        if is_file and name in file_fields:
            self.current.filename = opts[b"filename"].decode("utf-8", "replace")
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=spool_prefix("upload"))
            self.current.file = os.fdopen(fd, "wb")
            self.current.upload = UploadedFile(name, self.current.filename, Path(tmp))
            form.files[name] = self.current.upload
        elif not is_file and name in text_fields:
            pass
        elif name in file_fields or name in text_fields:
            kind = "a file" if name in file_fields else "a plain field, not a file"
            self.fail(BadInput(f"form field {name!r} must be {kind}", MALFORMED_UPLOAD))
        else:
            known = ", ".join(sorted(file_fields | text_fields))
            self.fail(BadInput(f"unknown form field {name!r}; the form's fields are: {known}", MALFORMED_UPLOAD))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        current = self.current
        if self.errors or current.name is None:
            return
        chunk = data[start:end]
        if current.upload is not None and current.file is not None:
            current.upload.size += len(chunk)
            limit = self.file_limits.get(current.name)
            if limit is not None and current.upload.size > limit[0]:
                self.fail(TooLarge(f"{limit[2]} is larger than the limit of {limit[0]} bytes", limit[1]))
                return
            current.file.write(chunk)
        else:
            current.buffer.extend(chunk)
            if len(current.buffer) > MAX_FIELD_BYTES:
                self.fail(BadInput(f"form field {current.name!r} is longer than {MAX_FIELD_BYTES} bytes",
                                   MALFORMED_UPLOAD))

    def on_part_end(self) -> None:
        current = self.current
        if current.file is not None:
            current.file.close()
            current.file = None
        elif current.name is not None and not self.errors and current.upload is None:
            try:
                self.form.fields[current.name] = current.buffer.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(BadInput(f"form field {current.name!r} is not UTF-8", MALFORMED_UPLOAD))


async def read_form(
    content_type: str | None,
    body: AsyncIterator[bytes],
    *,
    tmp_dir: Path,
    file_fields: frozenset[str],
    text_fields: frozenset[str],
    max_body_bytes: int,
    file_limits: dict[str, tuple[int, str, str]] | None = None,
) -> ParsedForm:
    """Read a multipart body; file parts go to ``tmp_dir``.

    ``file_limits`` maps a file field to (max bytes, error code, what it is) for fields with
    a tighter limit than the whole body (captions, labels). Unknown or repeated fields are
    errors: a client that misspells a field learns it now, not from a surprising verdict.
    On any error every temporary file is removed before the exception propagates.
    """
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise BadInput("the request must be multipart/form-data with a boundary", MALFORMED_UPLOAD)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    reader = _FormReader(tmp_dir, file_fields, text_fields, file_limits or {})
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_body_bytes:
                raise TooLarge(f"the upload is larger than the limit of {max_body_bytes} bytes",
                               UPLOAD_TOO_LARGE)
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise BadInput(f"the multipart body is malformed ({exc})", MALFORMED_UPLOAD) from None
            reader.raise_first()
        try:
            parser.finalize()
        except MultipartParseError as exc:
            raise BadInput(f"the multipart body is malformed ({exc})", MALFORMED_UPLOAD) from None
        reader.raise_first()
        if reader.current.file is not None:
            raise BadInput("the multipart body ends inside a part", MALFORMED_UPLOAD)
    except BaseException:
        reader.abandon()
        raise
    return reader.form
