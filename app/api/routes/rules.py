"""/v1/upload-rules: what an upload must be, as data (no key needed: the rules are no secret).

The web page's preview reads them, so that it refuses exactly what the service refuses:
the accepted image suffixes and formats (by their leading bytes), the archives and unsafe
paths refused inside a set, the archivers' metadata skipped, and the fewest images per set
each protocol needs (app/uploads.py is their one source).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fastapi import APIRouter

from app.uploads import upload_rules

router = APIRouter(tags=["audits"])


@lru_cache(maxsize=1)
def _rules() -> dict[str, Any]:
    return upload_rules()


@router.get("/upload-rules", summary="What an upload must be (the web page's preview applies these rules)")
def get_upload_rules() -> dict[str, Any]:
    return _rules()
