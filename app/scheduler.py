"""Fair scheduling across tenants: which queued audit a free worker runs next.

Celery carries the work, one ``run_audit`` message per audit, in the order they were sent;
this module decides, from the database, which audit a worker runs when it takes one. A
message whose audit is queued does not necessarily run that audit: the worker asks
:func:`fair_choice`, and when another tenant deserves the turn it runs that tenant's audit
and sends the message's audit again, to the back of the queue (the message it took is
acknowledged once its work ends). No audit loses its message, and every message runs one
audit; a message whose audit already ran finds it finished and does nothing.

The turn goes to the tenant with the fewest audits running; among those, to the one whose
last audit started longest ago (or never): round-robin between tenants with work waiting.
Within a tenant, its oldest queued audit goes first. So with tenant A holding ten queued
audits and tenant B one, B's audit is the next to start once a worker is free: it waits at
most for the audits already running.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.storage.models import RUNNING_STATES, Audit, AuditState, utcnow

_NEVER = datetime(1970, 1, 1, tzinfo=timezone.utc)


def next_audits(session: Session, limit: int = 20) -> list[uuid.UUID]:
    """The queued audits in the order they deserve to run (the first: the next one)."""
    now = utcnow()
    waiting = list(session.execute(
        select(Audit.id, Audit.tenant_id, Audit.created_at)
        .where(Audit.state == AuditState.QUEUED.value, Audit.deleted_at.is_(None),
               (Audit.lease_owner.is_(None)) | (Audit.lease_expires_at < now))
        .order_by(Audit.created_at, Audit.id)))
    if not waiting:
        return []
    tenants = {row.tenant_id for row in waiting}
    running = dict(session.execute(
        select(Audit.tenant_id, func.count()).where(Audit.tenant_id.in_(tenants), Audit.state.in_(RUNNING_STATES))
        .group_by(Audit.tenant_id)).all())
    served = dict(session.execute(
        select(Audit.tenant_id, func.max(Audit.started_at)).where(Audit.tenant_id.in_(tenants))
        .group_by(Audit.tenant_id)).all())
    queues: dict[uuid.UUID, list[uuid.UUID]] = {}
    for row in waiting:
        queues.setdefault(row.tenant_id, []).append(row.id)
    # Round-robin from the tenant who deserves the turn: fewest running, then served longest ago.
    order = sorted(queues, key=lambda t: (int(running.get(t, 0)), _aware(served.get(t)) or _NEVER,
                                          _aware(min(r.created_at for r in waiting if r.tenant_id == t))))
    out: list[uuid.UUID] = []
    depth = 0
    while len(out) < limit and any(depth < len(queues[t]) for t in order):
        out.extend(queues[t][depth] for t in order if depth < len(queues[t]))
        depth += 1
    return out[:limit]


def fair_choice(session: Session, audit_id: uuid.UUID) -> list[uuid.UUID]:
    """The audits a worker that took ``audit_id``'s message should try to run instead, best
    first; empty when that audit is not queued (a final step, a redelivery: run it as sent)
    or is itself the next one."""
    audit = session.get(Audit, audit_id)
    if audit is None or audit.state != AuditState.QUEUED.value:
        return []
    order = next_audits(session)
    if not order or order[0] == audit_id:
        return []
    return order


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


__all__ = ["fair_choice", "next_audits"]
