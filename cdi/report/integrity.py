"""Sealing a report (digest, optional Ed25519 signature) and verifying one.

* The **digest** is SHA-256 of the report's canonical JSON (:mod:`cdi.report.canonical`),
  without its ``integrity`` and ``service`` members. It is printed on every page of the PDF,
  so a PDF and a JSON file can be matched.
* The **signature** (optional) is an Ed25519 signature, by a deployment's key, of the ASCII
  message ``"cdi-report/1 sha256:" + digest``: signing the digest lets anyone holding only
  the PDF check that the digest printed on it was signed. The report carries the public key
  and its id; a verifier trusts it only if it matches a key obtained separately
  (``cdi verify --public-key``).

Keys: a private key is a PEM file (PKCS #8, unencrypted), as written by
``openssl genpkey -algorithm ed25519 -out signing-key.pem``; its public key as written by
``openssl pkey -in signing-key.pem -pubout`` or as the base64 of the raw 32 bytes (the
report's ``integrity.signature.public_key``). ``CDI_SIGNING_KEY`` names the private key
file (or holds the PEM text itself).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdi.report.canonical import content_digest
from cdi.report.errors import ReportFormatError, SigningKeyError
from cdi.report.model import SCHEMA_VERSION, Integrity, Report, Signature, parse_report

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "SIGNING_KEY_ENV",
    "Verification",
    "key_id",
    "load_private_key",
    "load_public_key",
    "seal",
    "seal_document",
    "signed_message",
    "signing_key_from_env",
    "verify_document",
]

#: The environment variable naming the deployment's signing key (a file, or the PEM text).
SIGNING_KEY_ENV = "CDI_SIGNING_KEY"


def signed_message(digest: str) -> bytes:
    """The bytes an Ed25519 signature of a report signs."""
    return f"{SCHEMA_VERSION} sha256:{digest}".encode("ascii")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 of the raw public key: a short name for the key."""
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


def load_private_key(source: str | os.PathLike[str] | bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file's path, or from PEM bytes / text."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _key_bytes(source, "signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the signing key is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(source: str | os.PathLike[str] | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key: a PEM file (or PEM text), or the base64 of the raw 32 bytes.

    A PEM *private* key is accepted too (its public half is used).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    data = _key_bytes(source, "public key")
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            if b"PRIVATE KEY" in text.splitlines()[0]:
                private = load_pem_private_key(text, password=None)
                if not isinstance(private, Ed25519PrivateKey):
                    raise SigningKeyError(f"the key is a {type(private).__name__}, not an Ed25519 key")
                return private.public_key()
            key = load_pem_public_key(text)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"the public key cannot be read ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"the public key is a {type(key).__name__}, not an Ed25519 key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError("the public key is neither PEM nor base64") from None
    if len(raw) != 32:
        raise SigningKeyError(f"a raw Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _key_bytes(source: str | os.PathLike[str] | bytes, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode()
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def signing_key_from_env(environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey | None:
    """The key ``CDI_SIGNING_KEY`` names (a PEM file or the PEM text), or ``None`` when unset."""
    env = os.environ if environ is None else environ
    value = env.get(SIGNING_KEY_ENV, "").strip()
    if not value:
        return None
    try:
        return load_private_key(value)
    except SigningKeyError as exc:
        raise SigningKeyError(f"{SIGNING_KEY_ENV}: {exc}") from None


def _signature(digest: str, key: Ed25519PrivateKey) -> Signature:
    public = key.public_key()
    return Signature(
        algorithm="ed25519",
        public_key=base64.b64encode(_raw_public(public)).decode("ascii"),
        key_id=key_id(public),
        value=base64.b64encode(key.sign(signed_message(digest))).decode("ascii"),
    )


def seal(report: Report, signing_key: Ed25519PrivateKey | None = None) -> Report:
    """``report`` with its integrity block: the digest, and a signature when a key is given."""
    digest = content_digest(report.to_document())
    signature = _signature(digest, signing_key) if signing_key is not None else None
    return report.model_copy(update={"integrity": Integrity(
        canonicalization="jcs-rfc8785", digest_algorithm="sha256", digest=digest, signature=signature)})


def seal_document(document: Mapping[str, Any], signing_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """A report given as JSON data, validated and sealed again (e.g. to sign it later)."""
    return seal(parse_report(document).model_copy(update={"integrity": None}), signing_key).to_document()


@dataclass
class Verification:
    """What :func:`verify_document` found. ``ok`` when nothing failed."""

    digest: str | None = None
    computed_digest: str | None = None
    signature: str = "absent"  # absent | valid | invalid
    key_id: str | None = None
    trusted_key: bool | None = None  # None: no trusted key was given
    problems: list[str] = field(default_factory=list)
    report: Report | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_document(document: Any, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check a report's schema, digest and signature.

    With ``public_key`` (the deployment's key, obtained separately), the report must be
    signed by that key; without it, a signature is checked against the key the report
    carries, which proves integrity but not origin.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    out = Verification()
    if not isinstance(document, Mapping):
        out.problems.append("the file is not a JSON object")
        return out
    try:
        out.report = parse_report(document)
    except ReportFormatError as exc:
        out.problems.append(str(exc))
    integrity = document.get("integrity")
    if not isinstance(integrity, Mapping) or not isinstance(integrity.get("digest"), str):
        out.problems.append("the report has no integrity digest")
        return out
    out.digest = integrity["digest"]
    try:
        out.computed_digest = content_digest(document)
    except ReportFormatError as exc:
        out.problems.append(f"the report cannot be canonicalised: {exc}")
        return out
    if out.computed_digest != out.digest:
        out.problems.append(
            f"digest mismatch: the report says {out.digest} but its content hashes to {out.computed_digest}: "
            "the file was changed after it was sealed")

    signature = integrity.get("signature")
    if signature is None:
        if public_key is not None:
            out.problems.append("a trusted public key was given, but the report is not signed")
        return out
    try:
        embedded = Ed25519PublicKey.from_public_bytes(base64.b64decode(signature["public_key"], validate=True))
        value = base64.b64decode(signature["value"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        out.signature = "invalid"
        out.problems.append("the signature block is malformed")
        return out
    out.key_id = key_id(embedded)
    if signature.get("key_id") != out.key_id:
        out.problems.append("the signature's key_id does not match its public key")
    try:
        # The signature covers the digest of the content, recomputed here, not the one written.
        embedded.verify(value, signed_message(out.computed_digest))
        out.signature = "valid"
    except InvalidSignature:
        out.signature = "invalid"
        out.problems.append("the signature does not match the report's content")
    if public_key is not None:
        out.trusted_key = _raw_public(public_key) == _raw_public(embedded)
        if not out.trusted_key:
            out.problems.append(
                f"the report is signed by key {out.key_id}, not by the trusted key {key_id(public_key)}")
    return out
