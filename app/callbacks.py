"""Callbacks: where they may go, and how they are signed.

**Where.** A callback URL is the tenant's, but the POST comes from inside the deployment, so
an address the tenant could not reach itself (the cloud's metadata service, the database, a
private network) is refused: loopback, private, link-local, shared, multicast, reserved and
unspecified addresses, in IPv4 and IPv6, IPv4-mapped IPv6, and the numeric forms
(``0x7f000001``, ``2130706433``, ``0177.0.0.1``) that resolvers accept. The submission is
checked for what it says literally; the delivery resolves the host, checks every address, and
connects to the checked address itself (the ``Host`` header and the TLS server name stay the
URL's), so DNS cannot answer differently in between. Redirects are not followed. The operator
can allow networks or host names with ``CDI_CALLBACK_ALLOW``.

**Signatures** follow Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature`` =
``v1,`` + base64(HMAC-SHA256(key, ``"{id}.{timestamp}.{body}"``)), where the key is the
base64-decoded part of the tenant's secret ``whsec_...``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app import errors as E
from app.errors import BadInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

#: Host names that always mean this machine.
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class CallbackRefused(ValueError):
    """The callback URL names an address callbacks may not reach."""


@dataclass(frozen=True)
class AllowList:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """``CDI_CALLBACK_ALLOW``: comma-separated networks (``10.0.0.0/8``), addresses or host names."""
        networks, hosts = [], set()
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)


def numeric_host(host: str) -> IPAddress | None:
    """The address a host written as a number means (every form ``inet_aton`` accepts), else None."""
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip.sixtofour is not None and not is_public(ip.sixtofour):
            return False
        if ip.teredo is not None:
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


def check_url(url: str, allow: AllowList) -> None:
    """What can be checked without resolving: scheme, host, and a literal address. Raises BadInput."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise BadInput("callback_url contains control characters", E.INVALID_CALLBACK_URL)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise BadInput(f"callback_url has an invalid port: {url!r}", E.INVALID_CALLBACK_URL) from None
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("http", "https") or not host or len(url) > 2000:
        raise BadInput(f"callback_url must be an http(s) URL, got {url!r}", E.INVALID_CALLBACK_URL)
    if parts.username or parts.password:
        raise BadInput("callback_url must not carry credentials", E.INVALID_CALLBACK_URL)
    del port
    if host in allow.hosts:
        return
    # A resolver maps the host (IDNA: NFKC, the ideographic and full-width full stops) before
    # it reads it as a number: "①②⑦.0.0.1", "１２７.０.０.１" and "127。0。0。1" are 127.0.0.1.
    mapped = _as_resolved(host)
    if mapped != host and (mapped in _LOCAL_NAMES or mapped.endswith(".localhost")
                           or numeric_host(mapped) is not None):
        raise BadInput(f"callback_url's host {host!r} is an address or a local name written in other "
                       f"characters ({mapped}); write a public host name or address in ASCII",
                       E.INVALID_CALLBACK_URL)
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        raise BadInput(f"callback_url names this machine ({host}); callbacks go to public addresses only "
                       "(the operator can allow others with CDI_CALLBACK_ALLOW)", E.INVALID_CALLBACK_URL)
    ip = numeric_host(host)
    if ip is not None and not is_public(ip) and not allow.allows(ip):
        raise BadInput(f"callback_url names a non-public address ({ip}); callbacks go to public addresses only "
                       "(the operator can allow others with CDI_CALLBACK_ALLOW)", E.INVALID_CALLBACK_URL)


def _as_resolved(host: str) -> str:
    """The host as a resolver reads it (UTS #46 mapping of the characters that matter here)."""
    mapped = unicodedata.normalize("NFKC", host)
    for dot in ("\u3002", "\uff0e", "\uff61"):
        mapped = mapped.replace(dot, ".")
    return mapped.lower().rstrip(".")


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def resolve(url: str, allow: AllowList, resolver: Resolver = _system_resolver) -> tuple[str, str]:
    """The URL with its host replaced by a checked address, and the original host.

    Every address the host resolves to must be allowed (one bad answer refuses the URL).
    Raises :class:`CallbackRefused`.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        raise CallbackRefused("no host")
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
    except (OSError, UnicodeError, ValueError) as exc:
        raise CallbackRefused(f"{host} does not resolve ({exc})") from None
    if not addresses:
        raise CallbackRefused(f"{host} does not resolve")
    if host not in allow.hosts:
        bad = [a for a in addresses if not is_public(a) and not allow.allows(a)]
        if bad:
            raise CallbackRefused(f"{host} resolves to a non-public address ({bad[0]})")
    ip = addresses[0]
    netloc = f"[{ip}]" if ip.version == 6 else str(ip)
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host


# --- signatures ---------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300,
           now: float | None = None) -> bool:
    """What a receiver does (docs/service.md shows the same in a few lines)."""
    msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    return any(hmac.compare_digest(expected, sig.split(",", 1)[1])
               for sig in headers["webhook-signature"].split() if sig.startswith("v1,"))


def signed_request(secret: str, msg_id: str, payload: dict[str, Any],
                   timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and the Standard Webhooks headers of one delivery."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    ts = int(time.time()) if timestamp is None else timestamp
    return body, {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                  "webhook-signature": sign(secret, msg_id, ts, body)}


def deliver(url: str, payload: dict[str, Any], *, secret: str, msg_id: str, allow: AllowList, timeout: float,
            resolver: Resolver = _system_resolver, transport: Any = None) -> tuple[bool, str, bool]:
    """POST the signed payload to the checked address; returns (delivered, reason, worth retrying)."""
    import httpx

    try:
        check_url(url, allow)
        target, host = resolve(url, allow, resolver)
    except (BadInput, CallbackRefused) as exc:
        return False, f"refused: {getattr(exc, 'message', exc)}", False
    body, headers = signed_request(secret, msg_id, payload)
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
    headers.update({"Host": netloc, "User-Agent": "cdi-audit-callback/2", "X-CDI-Audit": msg_id.split("_")[1]})
    try:
        with httpx.Client(follow_redirects=False, timeout=timeout, transport=transport, trust_env=False) as client:
            response = client.post(target, content=body, headers=headers, extensions={"sni_hostname": host})
    except httpx.HTTPError as exc:
        return False, type(exc).__name__, True
    if 300 <= response.status_code < 400:
        return False, f"HTTP {response.status_code} (redirects are not followed)", False
    return response.status_code < 300, f"HTTP {response.status_code}", True


__all__ = ["AllowList", "CallbackRefused", "check_url", "deliver", "is_public", "new_secret", "numeric_host",
           "resolve", "sign", "signed_request", "verify"]
