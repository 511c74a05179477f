"""Per-tenant quotas and request-rate limits (docs/service.md, "Quotas and limits").

Quotas are counted in the database, so they hold across API processes: audits queued or
running at once, audits and images per UTC day, bytes of images stored. Request rates are
token buckets, per client address (checked before the API key, so that requests with a bad
key or none are throttled too) and per tenant, kept in Redis when the deployment has one
(shared by all API processes), else in the process's memory. The number of uploads being
received at once is counted per API process.

Every refusal is a :class:`app.errors.TooMany` (HTTP 429) that says when to try again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import errors as E
from app.errors import TooMany
from app.settings import Settings
from app.storage.models import TERMINAL_STATES, Audit, utcnow

log = logging.getLogger(__name__)


def _seconds_to_midnight(now: datetime) -> int:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()) + 1)

class Quotas:
    """The database-counted quotas of one tenant."""

    def __init__(self, session_factory: Callable[[], Session], settings: Settings) -> None:
        self.session_factory = session_factory
        self.settings = settings

    def check_submit(self, tenant_id: uuid.UUID) -> None:
        """Before an upload is read: audits running at once, audits per day."""
        s = self.settings
        now = utcnow()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        with self.session_factory() as session:
            active = int(session.scalar(
                select(func.count()).select_from(Audit)
                .where(Audit.tenant_id == tenant_id, Audit.state.not_in(TERMINAL_STATES))) or 0)
            today = int(session.scalar(
                select(func.count()).select_from(Audit)
                .where(Audit.tenant_id == tenant_id, Audit.created_at >= midnight)) or 0)
        if s.max_concurrent_audits and active >= s.max_concurrent_audits:
            raise TooMany(f"{active} audits of this tenant are queued or running, the limit is "
                          f"{s.max_concurrent_audits}; submit again when one has ended",
                          E.QUOTA_EXCEEDED, retry_after=60)
        if s.max_audits_per_day and today >= s.max_audits_per_day:
            raise TooMany(f"this tenant submitted {today} audits today (UTC), the limit is {s.max_audits_per_day}",
                          E.QUOTA_EXCEEDED, retry_after=_seconds_to_midnight(now))

    def check_upload(self, tenant_id: uuid.UUID, n_images: int, n_bytes: int) -> None:
        """After the upload was validated: images per day, bytes stored."""
        s = self.settings
        now = utcnow()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        with self.session_factory() as session:
            images_today = int(session.scalar(
                select(func.coalesce(func.sum(Audit.n_published + Audit.n_unpublished), 0))
                .where(Audit.tenant_id == tenant_id, Audit.created_at >= midnight)) or 0)
            stored = int(session.scalar(
                select(func.coalesce(func.sum(Audit.upload_bytes), 0))
                .where(Audit.tenant_id == tenant_id, Audit.images_deleted.is_(False))) or 0)
        if s.max_images_per_day and images_today + n_images > s.max_images_per_day:
            raise TooMany(f"this upload's {n_images} images would bring today's (UTC) total to "
                          f"{images_today + n_images}, above the limit of {s.max_images_per_day}",
                          E.QUOTA_EXCEEDED, retry_after=_seconds_to_midnight(now))
        if s.max_stored_bytes and stored + n_bytes > s.max_stored_bytes:
            raise TooMany(f"this upload's {n_bytes} bytes of images would bring this tenant's stored images "
                          f"to {stored + n_bytes} bytes, above the limit of {s.max_stored_bytes}; delete "
                          "retained audits or wait for running ones to end", E.QUOTA_EXCEEDED, retry_after=300)

@dataclass
class _Bucket:
    tokens: float
    stamp: float


class MemoryBuckets:
    """Token buckets in this process's memory (the embedded mode: one API process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, capacity: int) -> float:
        """Take a token from ``key``'s bucket (``capacity`` per minute); 0 if one was left, else
        the seconds until one will be."""
        rate = capacity / 60.0
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) > 100_000:  # forget idle buckets (full ones)
                    self._buckets = {k: v for k, v in self._buckets.items()
                                     if v.tokens + (now - v.stamp) * rate < capacity}
                b = self._buckets[key] = _Bucket(float(capacity), now)
            b.tokens = min(float(capacity), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / rate


#: One token bucket in a Redis hash, updated atomically on the server's clock (API processes
#: on several hosts share it whatever their own clocks say).
_REDIS_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = capacity / 60.0
local data = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(data[1]) or capacity
local stamp = tonumber(data[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('EXPIRE', KEYS[1], 61)
return tostring(wait)
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every API process of the deployment."""

    def __init__(self, url: str, prefix: str = "cdi:ratelimit:") -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.script = self.client.register_script(_REDIS_BUCKET)
        self.prefix = prefix

    def take(self, key: str, capacity: int) -> float:
        return float(self.script(keys=[self.prefix + key], args=[capacity]))


class Buckets(Protocol):
    def take(self, key: str, capacity: int) -> float: ...


def open_buckets(settings: Settings) -> Buckets:
    """The rate limits' store: Redis when the deployment has one (``CDI_RATE_LIMIT_URL``, or the
    broker's), else this process's memory."""
    url = settings.rate_limit_url or (settings.broker_url if settings.broker_url.startswith(
        ("redis://", "rediss://")) else "")
    # Deployments sharing one Redis keep apart by their audit queue's name.
    return RedisBuckets(url, prefix=f"cdi:ratelimit:{settings.audit_queue}:") if url else MemoryBuckets()


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests, refilled continuously.

    With Redis (:func:`open_buckets`) the buckets are shared by all API processes; if Redis
    cannot be reached the request is let through (and logged): an outage of the limiter's
    store must not take the API down with it.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 buckets: Buckets | None = None, scope: str = "tenant") -> None:
        self.per_minute = per_minute
        self.buckets = buckets if buckets is not None else MemoryBuckets(clock)
        self.scope = scope

    def take(self, key: uuid.UUID | str) -> None:
        if not self.per_minute:
            return
        try:
            wait = self.buckets.take(f"{self.scope}:{key}", self.per_minute)
        except Exception as exc:  # Redis unreachable: fail open, loudly
            log.warning("the rate limit could not be checked (%s); request let through", type(exc).__name__)
            return
        if wait <= 0:
            return
        seconds = max(1, int(wait + 0.999))
        who = "this client address" if self.scope == "address" else "this tenant"
        raise TooMany(f"more than {self.per_minute} requests per minute from {who}; slow down",
                      E.RATE_LIMITED, retry_after=seconds,
                      headers={"RateLimit-Limit": str(self.per_minute), "RateLimit-Remaining": "0",
                               "RateLimit-Reset": str(seconds),
                               "RateLimit-Policy": f"{self.per_minute};w=60"})


class UploadSlots:
    """How many uploads each tenant is sending to this process at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[uuid.UUID, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, tenant_id: uuid.UUID) -> Iterator[None]:
        with self._lock:
            n = self._active.get(tenant_id, 0)
            if self.limit and n >= self.limit:
                raise TooMany(f"{n} uploads of this tenant are in progress, the limit is {self.limit}",
                              E.QUOTA_EXCEEDED, retry_after=30)
            self._active[tenant_id] = n + 1
        try:
            yield
        finally:
            with self._lock:
                self._active[tenant_id] -= 1
                if not self._active[tenant_id]:
                    del self._active[tenant_id]

__all__ = ["AddressThrottle", "MemoryBuckets", "Quotas", "RateLimiter", "RedisBuckets", "UploadSlots", "open_buckets"]



class AddressThrottle:
    """ASGI middleware: every request counts against its client address's rate limit before
    anything else happens (authentication included); over the limit it answers 429 with
    ``Retry-After``. Health probes are not counted."""

    EXEMPT = ("/healthz", "/readyz")

    def __init__(self, app: Any, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.limiter.per_minute and scope.get("path") not in self.EXEMPT:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            try:
                await _in_thread(self.limiter.take, address)
            except TooMany as exc:
                from app.api.errors import error_response

                headers = {"Retry-After": str(exc.retry_after), **exc.headers}
                await error_response(429, exc.code, exc.message, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _in_thread(fn: Callable[..., None], *args: Any) -> None:
    """Redis is a network round trip: keep it off the event loop."""
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(fn, *args)
