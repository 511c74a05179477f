"""The local feature cache of ``cdi audit`` and :func:`cdi.run_audit`.

A :class:`cdi.audit.FeatureStore` in a folder of the user's cache: a second audit of the
same images against the same model, with the same seed and feature options, computes no
feature (its summary says so). Rows are keyed as the service keys them: the library's
feature key (model identity, feature layout, feature configuration, seed, feature set),
hashed, then the image's SHA-256, so a row is found again only by an audit that would
compute exactly the same values.

Where: ``CDI_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/cdi/features``, else
``~/.cache/cdi/features``. ``cdi audit --no-cache`` (``cache=False``) neither reads nor
writes it; deleting the folder empties it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

CACHE_ENV = "CDI_CACHE_DIR"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> Path:
    """The user's feature cache folder (see the module's docstring)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cdi" / "features"


class LocalFeatureStore:
    """Per-image feature rows in files: ``<root>/<hashed key>/<sha[:2]>/<sha>.npy``.

    Writes are atomic (a temporary file renamed into place), so two audits running at once,
    or one interrupted, never leave a torn row; a row that cannot be read is computed again.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def _folder(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode("utf-8")).hexdigest()

    def _path(self, folder: Path, sha: str) -> Path | None:
        sha = sha.lower()
        if not _SHA256.match(sha):  # never a path built from anything but a hash
            return None
        return folder / sha[:2] / f"{sha}.npy"

    def load(self, key: str, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        folder = self._folder(key)
        if not folder.is_dir():
            return {}
        out: dict[str, np.ndarray] = {}
        for sha in dict.fromkeys(sha256s):
            path = self._path(folder, sha)
            if path is None or not path.is_file():
                continue
            try:
                out[sha] = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                continue  # unreadable: computed again, and overwritten
        return out

    def save(self, key: str, rows: Mapping[str, np.ndarray]) -> None:
        folder = self._folder(key)
        for sha, row in rows.items():
            path = self._path(folder, sha)
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(row), allow_pickle=False)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(buf.getvalue())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


__all__ = ["CACHE_ENV", "LocalFeatureStore", "default_cache_dir"]
