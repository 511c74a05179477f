"""The ``s3://bucket/prefix`` form of ``CDI_BLOB_URL``, read in one place.

A leaf module: the settings check the URL when they load, the S3 blob store reads its bucket
and prefix from it, and neither imports the other.
"""

from __future__ import annotations

import re

__all__ = ["parse_s3_url"]


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix"). Raises ValueError."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    # S3's bucket naming rules (3-63 characters, lowercase letters, digits, dots, hyphens).
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{url!r} does not name a valid bucket (3 to 63 lowercase letters, digits, '.' or '-')")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r} has an empty, '.' or '..' part in its prefix")
    return bucket, prefix
