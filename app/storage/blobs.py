"""Content-addressed blob storage: one file per SHA-256 under a directory.

A blob's path is ``<root>/<sha[:2]>/<sha[2:4]>/<sha>``. Writes go to a temporary file on
the same filesystem and are renamed into place, so a reader never sees a partial blob and
two writers of the same content both succeed.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class BlobNotFound(LookupError):
    pass


class BlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    @property
    def tmp_dir(self) -> Path:
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, src: str | os.PathLike[str], sha256: str) -> Path:
        """Move ``src`` (a file under :attr:`tmp_dir`, whose hash the caller computed) into place."""
        dst = self.path(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return dst

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenated ``chunks``; returns (sha256, size)."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"put-{socket.gethostname()}-{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            digest = h.hexdigest()
            self.put_file(tmp, digest)
            return digest, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, data: bytes) -> str:
        return self.put_stream([data])[0]

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def read(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
            return True
        except FileNotFoundError:
            return False


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
