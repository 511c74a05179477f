"""API keys: generation, parsing and hashing.

A key reads ``cdi_<key_id>_<secret>``: ``key_id`` (16 hex digits) is stored in clear to
find the row, ``secret`` (43 URL-safe characters, 256 random bits) only as its SHA-256.
A fast hash is the right one here: the secret is a uniformly random 256-bit string, not a
password, so there is nothing for a slow hash to protect against (GitHub and Stripe store
their tokens the same way). Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "cdi"
_KEY = re.compile(r"^cdi_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret_sha256: str
    #: The full key, shown to its owner once and never stored.
    plaintext: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def generate_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id=key_id, secret_sha256=hash_secret(secret), plaintext=f"{PREFIX}_{key_id}_{secret}")


def parse_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else ``None``."""
    m = _KEY.match(key.strip())
    if m is None:
        return None
    return m.group(1), m.group(2)


def secret_matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_sha256)
