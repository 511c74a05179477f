"""Spool files: uploads being received and validated, on disk beside the blobs.

Their names say which host and process writes them, so the files of a process that died
mid-upload are removed at the next start-up or reconciler pass; any file older than
``CDI_SPOOL_MAX_AGE`` goes too.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from app.settings import Settings

log = logging.getLogger(__name__)


def clean_spool(settings: Settings, max_age: float | None = None) -> int:
    """Remove spooled upload files older than ``max_age`` seconds (default CDI_SPOOL_MAX_AGE)."""
    age = settings.spool_max_age if max_age is None else max_age
    folder = settings.upload_tmp_dir
    if not folder.is_dir():
        return 0
    cutoff = time.time() - age
    removed = 0
    for path in folder.iterdir():
        try:
            if path.is_file() and (path.stat().st_mtime < cutoff or spool_owner_dead(path.name)):
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    if removed:
        log.info("spool cleaned", extra={"files": removed})
    return removed


def spool_prefix(kind: str) -> str:
    """Prefix of a spool file: names the host and process writing it, so that the files of a
    process that died can be removed at once (:func:`spool_owner_dead`)."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-"


def spool_owner_dead(name: str) -> bool:
    """True if ``name`` was written by a process of this host that no longer exists."""
    host = socket.gethostname()
    _kind, _, rest = name.partition("-")
    if not rest.startswith(f"{host}-"):
        return False
    pid_text = rest[len(host) + 1:].split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


