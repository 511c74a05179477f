"""API keys: format, hashing, parsing (app.security)."""

from __future__ import annotations

import hashlib

from app import security


def test_a_new_key_is_stored_only_as_a_hash() -> None:
    new = security.generate_key()
    assert new.plaintext.startswith(f"cdi_{new.key_id}_")
    parsed = security.parse_key(new.plaintext)
    assert parsed is not None and parsed[0] == new.key_id
    assert new.plaintext == f"cdi_{new.key_id}_{parsed[1]}"
    assert new.secret_sha256 == hashlib.sha256(parsed[1].encode()).hexdigest()
    assert security.secret_matches(parsed[1], new.secret_sha256)
    assert not security.secret_matches(parsed[1][:-1] + ("A" if parsed[1][-1] != "A" else "B"), new.secret_sha256)


def test_keys_are_unique_and_carry_256_random_bits() -> None:
    keys = {security.generate_key().plaintext for _ in range(200)}
    assert len(keys) == 200
    parsed = security.parse_key(next(iter(keys)))
    assert parsed is not None and len(parsed[1]) == 43  # 32 bytes, URL-safe base64


def test_malformed_keys_are_refused() -> None:
    good = security.generate_key().plaintext
    for bad in ["", "cdi", "Bearer " + good, good + "x", good.replace("cdi_", "cdx_"), "cdi_zz_" + "a" * 43]:
        assert security.parse_key(bad) is None, bad

