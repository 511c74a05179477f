"""Celery tasks. They take ids, reload state from the database, and are idempotent.

* ``run_audit(audit_id)``: runs the audit (:class:`worker.runner.AuditRunner`). Running it
  again after it finished does nothing; running it while another worker holds the audit
  re-queues it for later; running it after a crash resumes from the stored features.
* ``deliver_callback(audit_id)``: POSTs the audit's final status to its callback URL,
  retrying with exponential backoff.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta
from functools import lru_cache
from typing import Any

from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from app.settings import Settings
from app.storage.blobs import BlobStore
from app.storage.db import engine_for, session_factory
from app.storage.models import utcnow
from app.storage.repositories import AuditRepository
from worker.celery_app import celery
from worker.models import get_model
from worker.runner import AuditRunner

log = logging.getLogger(__name__)


def settings() -> Settings:
    return celery.conf.cdi_settings  # type: ignore[no-any-return]


@lru_cache(maxsize=1)
def runner() -> AuditRunner:
    s = settings()
    return AuditRunner(s, session_factory(s.database_url), BlobStore(s.blobs), get_model)


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    # A forked pool process must not share the parent's database connections.
    engine_for(settings().database_url).dispose(close=False)


@celery.task(name="worker.tasks.run_audit", bind=True, acks_late=True, reject_on_worker_lost=True,
             autoretry_for=(OperationalError,), retry_backoff=5, retry_backoff_max=300, max_retries=20)
def run_audit(self: Task, audit_id: str) -> str:
    outcome = runner().run(uuid.UUID(audit_id))
    if outcome == "busy":
        # Another live worker holds the audit (a redelivered message): look again when its
        # lease would have run out, so that the audit survives that worker dying too.
        raise self.retry(countdown=settings().lease_seconds, max_retries=None)
    if outcome in ("done", "failed"):
        queue_callback(uuid.UUID(audit_id))
    return outcome


def queue_callback(audit_id: uuid.UUID) -> None:
    with session_factory(settings().database_url)() as session:
        audit = AuditRepository(session).get(audit_id)
        if audit is None or not audit.callback_url:
            return
        AuditRepository(session).set_callback_state(audit_id, "pending")
        session.commit()
    deliver_callback.apply_async(args=[str(audit_id)], queue=settings().callback_queue)


@celery.task(name="worker.tasks.deliver_callback", bind=True, acks_late=True, max_retries=None)
def deliver_callback(self: Task, audit_id: str) -> str:
    import httpx

    from app.schemas import AuditStatus

    s = settings()
    with session_factory(s.database_url)() as session:
        repo = AuditRepository(session)
        audit = repo.get(uuid.UUID(audit_id))
        if audit is None or not audit.callback_url or audit.callback_state == "delivered":
            return "nothing to do"
        body = AuditStatus.of(audit).model_dump(mode="json")
        url = audit.callback_url
    try:
        response = httpx.post(url, json=body, timeout=s.callback_timeout,
                              headers={"User-Agent": "cdi-audit-callback/1", "X-CDI-Audit": audit_id})
        ok = response.status_code < 300
        reason = f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        ok, reason = False, type(exc).__name__
    with session_factory(s.database_url)() as session:
        repo = AuditRepository(session)
        if ok:
            repo.set_callback_state(uuid.UUID(audit_id), "delivered")
            session.commit()
            return "delivered"
        if self.request.retries + 1 >= s.callback_attempts:
            repo.set_callback_state(uuid.UUID(audit_id), "failed")
            session.commit()
            log.warning("callback of audit %s failed for good (%s)", audit_id, reason)
            return "failed"
    log.info("callback of audit %s failed (%s); retrying", audit_id, reason)
    raise self.retry(countdown=s.callback_backoff * 2**self.request.retries)


# --- recovery of audits whose worker died -------------------------------------------------


def requeue_orphans(s: Settings | None = None) -> list[uuid.UUID]:
    """Queue again the running audits whose lease ran out (their worker died).

    Redis redelivers a dead worker's message by itself (visibility timeout); other brokers
    (the embedded mode's SQLite one) do not, and this sweep covers them. A duplicate message
    does no harm: the task is idempotent.
    """
    s = s or settings()
    requeued = []
    with session_factory(s.database_url)() as session:
        repo = AuditRepository(session)
        for audit in repo.orphaned(grace=timedelta(seconds=s.lease_seconds)):
            if repo.requeue(audit.id):
                requeued.append(audit.id)
        session.commit()
    for audit_id in requeued:
        celery.send_task("worker.tasks.run_audit", args=[str(audit_id)], queue=s.audit_queue)
        log.warning("audit %s lost its worker; queued again", audit_id)
    return requeued


_sweeper_stop = threading.Event()


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    s = settings()

    def loop() -> None:
        while not _sweeper_stop.is_set():
            try:
                requeue_orphans(s)
            except Exception:
                log.exception("the orphan sweep failed; it will run again")
            _sweeper_stop.wait(max(2.0, s.lease_seconds / 2))

    threading.Thread(target=loop, name="cdi-orphan-sweep", daemon=True).start()
    log.info("worker ready", extra={"queues": [s.audit_queue, s.callback_queue], "started": utcnow().isoformat()})


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    _sweeper_stop.set()
