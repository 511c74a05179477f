"""Per-tenant quotas and request-rate limits (docs/service.md, "Quotas and limits").

Quotas are counted in the database, so they hold across API processes: audits queued or
running at once, audits and images per UTC day, bytes of images stored. The request rate and
the number of uploads being received at once are counted per API process, in memory (a token
bucket per tenant): with N API processes a tenant gets up to N times the rate.

Every refusal is a :class:`app.errors.TooMany` (HTTP 429) that says when to try again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import errors as E
from app.errors import TooMany
from app.settings import Settings
from app.storage.models import TERMINAL_STATES, Audit, utcnow


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

class RateLimiter:
    """A token bucket per tenant: ``per_minute`` requests, refilled continuously."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[uuid.UUID, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, tenant_id: uuid.UUID) -> None:
        if not self.per_minute:
            return
        rate = self.per_minute / 60.0
        now = self.clock()
        with self._lock:
            b = self._buckets.get(tenant_id)
            if b is None:
                b = self._buckets[tenant_id] = _Bucket(float(self.per_minute), now)
            b.tokens = min(float(self.per_minute), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait = max(1, int((1.0 - b.tokens) / rate + 0.999))
        raise TooMany(f"more than {self.per_minute} requests per minute from this tenant; slow down",
                      E.RATE_LIMITED, retry_after=wait,
                      headers={"RateLimit-Limit": str(self.per_minute), "RateLimit-Remaining": "0",
                               "RateLimit-Reset": str(wait),
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

__all__ = ["Quotas", "RateLimiter", "UploadSlots"]

