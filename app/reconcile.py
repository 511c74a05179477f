"""The reconciler: what makes sure no audit is lost, and nothing is kept longer than it should be.

One pass (:func:`reconcile`) does, in order:

1. **Orphans**: running audits whose lease ran out (their worker died) go back to ``queued``.
2. **The outbox**: queued audits whose task was never handed to the broker (the API died
   between its commit and the send; ``enqueued_at`` is NULL) are sent.
3. **Lost tasks**: queued audits whose task is no longer in the broker (Redis restarted without
   its data, or was flushed) are sent again. When the broker cannot be inspected, an audit
   queued longer than ``CDI_REQUEUE_AFTER`` is sent again. A duplicate message is harmless:
   the worker's lease guarantees one runner, and a finished audit is skipped.
4. **Callbacks** of ended audits that were never queued, or whose delivery stalled.
5. **Retention**: ended audits that still hold images they should not (their worker died
   between the end and the clean-up) give them up; ended audits older than their tenant's
   retention period (``CDI_RETENTION_DAYS``, 90 days, or the tenant's own: ``PUT
   /v1/retention``) are erased as a DELETE erases them.
6. **Blobs**: a mark-and-sweep of blobs that nothing references or claims (app.storage.ledger).
7. **Spool**: temporary upload files older than ``CDI_SPOOL_MAX_AGE`` (an API killed mid-upload).
8. **Heartbeats** of workers gone for long are forgotten.

It runs as a Celery beat task in server mode, as a loop in the embedded worker, and on demand
with ``cdi admin reconcile``. Every step is idempotent, so two reconcilers at once do no harm.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.queue import AuditQueue
from app.settings import Settings
from app.spool import clean_spool
from app.storage.blobs import BlobStore
from app.storage.ledger import BlobLedger
from app.storage.models import (
    RUNNING_STATES,
    TERMINAL_STATES,
    Audit,
    AuditState,
    Tenant,
    WorkerHeartbeat,
    utcnow,
)
from app.storage.repositories import AuditRepository

log = logging.getLogger(__name__)

#: Seconds an audit may go unsent after its commit before the reconciler sends it (the API
#: sends it itself right after committing; this only covers an API that died in between).
OUTBOX_GRACE = 30


@dataclass(frozen=True)
class Stuck:
    """An audit that will not progress by itself, and why."""

    audit_id: uuid.UUID
    tenant_id: uuid.UUID
    state: str
    since: datetime
    reason: str
    #: "requeue" (sent again by the reconciler) or "send" (never sent).
    action: str


@dataclass
class ReconcileReport:
    requeued: list[uuid.UUID] = field(default_factory=list)
    sent: list[uuid.UUID] = field(default_factory=list)
    callbacks: list[uuid.UUID] = field(default_factory=list)
    images_retired: int = 0
    blobs_collected: int = 0
    spool_removed: int = 0
    #: Ended audits erased because their retention period ran out.
    expired: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requeued": len(self.requeued), "sent": len(self.sent), "callbacks": len(self.callbacks),
                "images_retired": self.images_retired, "expired": self.expired,
                "blobs_collected": self.blobs_collected,
                "spool_removed": self.spool_removed}


def find_stuck(session: Session, settings: Settings, queue: AuditQueue | None) -> list[Stuck]:
    """Audits queued or running that nothing will run: what ``cdi admin audits --stuck`` lists."""
    now = utcnow()
    lease = timedelta(seconds=settings.lease_seconds)
    out: list[Stuck] = []
    for a in session.scalars(select(Audit).where(Audit.state.in_(RUNNING_STATES),
                                                 Audit.lease_expires_at < now - lease)):
        assert a.lease_expires_at is not None
        out.append(Stuck(a.id, a.tenant_id, a.state, a.lease_expires_at,
                         f"its worker's lease ran out {int((now - a.lease_expires_at).total_seconds())} s ago "
                         "(the worker died)", "requeue"))
    queued = list(session.scalars(select(Audit).where(Audit.state == AuditState.QUEUED.value)
                                  .order_by(Audit.created_at)))
    if not queued:
        return out
    pending = _pending(queue)
    for a in queued:
        if a.enqueued_at is None:
            if a.created_at < now - timedelta(seconds=OUTBOX_GRACE):
                out.append(Stuck(a.id, a.tenant_id, a.state, a.created_at,
                                 "its task was never handed to the broker (the API stopped after committing)",
                                 "send"))
            continue
        if a.enqueued_at > now - timedelta(seconds=OUTBOX_GRACE):
            continue
        if pending is not None:
            if str(a.id) not in pending:
                out.append(Stuck(a.id, a.tenant_id, a.state, a.enqueued_at,
                                 "its task is not in the broker (lost: broker restarted without its data?)",
                                 "requeue"))
        elif a.enqueued_at < now - timedelta(seconds=settings.requeue_after):
            out.append(Stuck(a.id, a.tenant_id, a.state, a.enqueued_at,
                             f"queued for more than {settings.requeue_after} s, and the broker cannot be "
                             "inspected", "requeue"))
    return out


def _pending(queue: AuditQueue | None) -> set[str] | None:
    if queue is None:
        return None
    inspect = getattr(queue, "pending_ids", None)
    if inspect is None:
        return None
    try:
        return inspect()
    except Exception:
        log.warning("the broker could not be inspected; falling back to CDI_REQUEUE_AFTER", exc_info=True)
        return None


def reconcile(session_factory: Callable[[], Session], settings: Settings, blobs: BlobStore,
              queue: AuditQueue) -> ReconcileReport:
    """One pass of the reconciler (see the module's docstring)."""
    report = ReconcileReport()
    now = utcnow()
    with session_factory() as session:
        repo = AuditRepository(session)
        stuck = find_stuck(session, settings, queue)
        to_send: list[uuid.UUID] = []
        for s in stuck:
            if s.state in RUNNING_STATES:
                if repo.requeue(s.audit_id):
                    report.requeued.append(s.audit_id)
                    to_send.append(s.audit_id)
            else:
                (report.sent if s.action == "send" else report.requeued).append(s.audit_id)
                to_send.append(s.audit_id)
        session.commit()
    for audit_id in to_send:
        queue.enqueue(audit_id)
        with session_factory() as session:
            AuditRepository(session).mark_enqueued(audit_id)
            session.commit()
        log.warning("audit %s was stuck; sent again", audit_id)

    # Callbacks of ended audits: never queued, or pending for long (the message was lost).
    stale = now - timedelta(seconds=settings.requeue_after)
    with session_factory() as session:
        rows = list(session.scalars(
            select(Audit.id).where(
                Audit.state.in_(TERMINAL_STATES), Audit.callback_url.is_not(None),
                or_(Audit.callback_state.is_(None) & (Audit.finished_at < now - timedelta(seconds=OUTBOX_GRACE)),
                    (Audit.callback_state == "pending") & (Audit.updated_at < stale)))
            .limit(1000)))
        for audit_id in rows:
            session.execute(update(Audit).where(Audit.id == audit_id)
                            .values(callback_state="pending", updated_at=now)
                            .execution_options(synchronize_session=False))
        session.commit()
    for audit_id in rows:
        queue.enqueue_callback(audit_id)
        report.callbacks.append(audit_id)

    ledger = BlobLedger(session_factory, blobs, timedelta(seconds=settings.blob_claim_seconds))
    # Retention left undone (a worker died between ending the audit and letting go of its images).
    with session_factory() as session:
        ended = list(session.scalars(select(Audit.id).where(
            Audit.state.in_(TERMINAL_STATES), Audit.retain_images.is_(False),
            Audit.images_deleted.is_(False)).limit(1000)))
        for audit_id in ended:
            AuditRepository(session).end_images(audit_id)
        session.commit()
    report.images_retired = len(ended)
    report.expired = expire(session_factory, settings, ledger)
    report.blobs_collected = len(ledger.sweep())
    report.spool_removed = clean_spool(settings)
    with session_factory() as session:
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < now - timedelta(days=1))
                        .execution_options(synchronize_session=False))
        session.commit()
    return report


def expire(session_factory: Callable[[], Session], settings: Settings, ledger: BlobLedger,
           batch: int = 200) -> int:
    """Retention: erase (as DELETE does) the ended audits whose tenant's retention period ran
    out since they ended; returns how many."""
    now = utcnow()
    erased = 0
    with session_factory() as session:
        custom = set(session.scalars(select(Tenant.retention_days).where(Tenant.retention_days.is_not(None))
                                     .distinct()))
        periods: list[tuple[Any, int]] = [(Tenant.retention_days.is_(None), settings.retention_days)]
        periods += [(Tenant.retention_days == days, int(days)) for days in custom if days is not None]
        due: list[uuid.UUID] = []
        for which, days in periods:
            if days <= 0:  # kept until deleted
                continue
            due += session.scalars(
                select(Audit.id).join(Tenant, Tenant.id == Audit.tenant_id)
                .where(which, Audit.state.in_(TERMINAL_STATES), Audit.deleted_at.is_(None),
                       Audit.finished_at < now - timedelta(days=days))
                .order_by(Audit.finished_at).limit(batch))
    for audit_id in due:
        with session_factory() as session:
            repo = AuditRepository(session)
            audit = repo.get(audit_id)
            if audit is None or audit.deleted_at is not None:
                continue
            _, shas = repo.erase(audit)
            session.commit()
        ledger.collect(shas)
        erased += 1
        log.info("audit erased: its retention period ran out", extra={"audit_id": str(audit_id)})
    return erased


def beat(session_factory: Callable[[], Session], name: str) -> None:
    """Record that the worker ``name`` is alive (``/readyz`` reads these)."""
    now = utcnow()
    with session_factory() as session:
        row = session.get(WorkerHeartbeat, name)
        if row is None:
            session.add(WorkerHeartbeat(name=name, seen_at=now))
        else:
            row.seen_at = now
        session.commit()


def forget(session_factory: Callable[[], Session], name: str) -> None:
    with session_factory() as session:
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name)
                        .execution_options(synchronize_session=False))
        session.commit()


def live_workers(session: Session, settings: Settings) -> int:
    cutoff = utcnow() - timedelta(seconds=3 * settings.worker_heartbeat_seconds)
    return len(list(session.scalars(select(WorkerHeartbeat.name).where(WorkerHeartbeat.seen_at >= cutoff))))


__all__ = ["ReconcileReport", "Stuck", "beat", "clean_spool", "expire", "find_stuck", "forget", "live_workers",
           "reconcile"]
