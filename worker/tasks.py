"""Celery tasks. They take ids, reload state from the database, and are idempotent.

* ``run_audit(audit_id)``: runs the audit (:class:`worker.runner.AuditRunner`), or, when
  another tenant's queued audit has the turn (:mod:`app.scheduler`), runs that one and sends
  ``audit_id`` again to the back of the queue. Running it
  again after it finished does nothing; running it while another worker holds the audit
  re-queues it for later; running it after a crash resumes from the stored features.
  An audit with more images than ``CDI_SHARD_SIZE`` is split: this task sends one
  ``run_shard`` per shard and returns; the last shard to finish sends ``run_audit`` again,
  which then finds every feature stored and scores, tests and reports.
* ``run_shard(audit_id, shard)``: extracts one shard's features into the database (only
  those not stored yet); any worker can take it, and a redelivered one resumes.
* ``deliver_callback(audit_id)``: POSTs the audit's final status to its callback URL,
  retrying with exponential backoff.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from functools import lru_cache
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from app.queue import RECONCILE, CeleryQueue
from app.reconcile import ReconcileReport, beat, forget, reconcile
from app.settings import Settings
from app.storage.blobs import BlobStoreUnavailable, open_blob_store
from app.storage.db import engine_for, session_factory
from app.storage.models import utcnow
from app.storage.repositories import AuditRepository, TenantRepository
from worker.celery_app import celery
from worker.models import get_model
from worker.runner import AuditRunner

log = logging.getLogger(__name__)


def settings() -> Settings:
    return celery.conf.cdi_settings


@lru_cache(maxsize=1)
def runner() -> AuditRunner:
    s = settings()
    return AuditRunner(s, session_factory(s.database_url), open_blob_store(s), get_model, queue=_queue(s))


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    # A forked pool process must not share the parent's database connections.
    engine_for(settings().database_url).dispose(close=False)


@celery.task(name="worker.tasks.run_audit", bind=True, acks_late=True, reject_on_worker_lost=True,
             autoretry_for=(OperationalError,), retry_backoff=5, retry_backoff_max=300, max_retries=20)
def run_audit(self: Task, audit_id: str) -> str:
    ident = uuid.UUID(audit_id)
    turn = _fair_turn(ident)
    if turn is not None:
        return turn
    outcome = runner().run(ident)
    if outcome == "busy":
        # Another live worker holds the audit (a redelivered message): look again when its
        # lease would have run out, so that the audit survives that worker dying too.
        raise self.retry(countdown=settings().lease_seconds, max_retries=None)
    if outcome in ("done", "failed"):
        queue_callback(uuid.UUID(audit_id))
    return outcome


@celery.task(name="worker.tasks.run_shard", bind=True, acks_late=True, reject_on_worker_lost=True,
             autoretry_for=(OperationalError,), retry_backoff=5, retry_backoff_max=300, max_retries=20)
def run_shard(self: Task, audit_id: str, shard: int) -> str:
    outcome = runner().run_shard(uuid.UUID(audit_id), int(shard))
    if outcome == "busy":
        # Another live worker holds the shard: look again when its lease would have run out.
        raise self.retry(countdown=settings().lease_seconds, max_retries=None)
    if outcome == "failed":
        queue_callback(uuid.UUID(audit_id))
    return outcome


def _fair_turn(audit_id: uuid.UUID) -> str | None:
    """Run the audit whose turn it is (app.scheduler) when that is not ``audit_id``, and send
    ``audit_id`` again to the back of the queue; None when ``audit_id`` itself should run."""
    from app.scheduler import fair_choice

    with session_factory(settings().database_url)() as session:
        order = fair_choice(session, audit_id)
    for other in order:
        if other == audit_id:
            return None
        outcome = runner().run(other)
        if outcome in ("busy", "skipped", "missing"):  # taken by another worker meanwhile
            continue
        _queue(settings()).enqueue(audit_id)
        if outcome in ("done", "failed"):
            queue_callback(other)
        log.info("another tenant's audit had the turn", extra={"audit_id": str(audit_id), "ran": str(other),
                                                                "outcome": outcome})
        return f"ran {other}: {outcome}"
    return None


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
    """POST the audit's final status, signed (Standard Webhooks), to its checked callback address."""
    from app.callbacks import AllowList, deliver
    from app.schemas import AuditStatus

    s = settings()
    ident = uuid.UUID(audit_id)
    with session_factory(s.database_url)() as session:
        repo = AuditRepository(session)
        audit = repo.get(ident)
        if audit is None or not audit.callback_url or audit.callback_state == "delivered":
            return "nothing to do"
        body = AuditStatus.of(audit).model_dump(mode="json")
        url = audit.callback_url
        secret = TenantRepository(session).webhook_secret(audit.tenant_id)
        msg_id = f"msg_{audit_id}_{audit.state}"
        session.commit()
    try:
        ok, reason, retry = deliver(url, body, secret=secret, msg_id=msg_id,
                                    allow=AllowList.parse(s.callback_allow), timeout=s.callback_timeout)
    except Exception as exc:  # never leave the callback pending because of a bug or a hostile URL
        log.exception("callback of audit %s could not be sent", audit_id)
        ok, reason, retry = False, type(exc).__name__, False
    with session_factory(s.database_url)() as session:
        repo = AuditRepository(session)
        if ok:
            repo.set_callback_state(ident, "delivered")
            session.commit()
            return "delivered"
        if not retry or self.request.retries + 1 >= s.callback_attempts:
            repo.set_callback_state(ident, "failed")
            session.commit()
            log.warning("callback of audit %s failed for good (%s)", audit_id, reason)
            return "failed"
    log.info("callback of audit %s failed (%s); retrying", audit_id, reason)
    raise self.retry(countdown=s.callback_backoff * 2**self.request.retries)


# --- recovery: the reconciler, and this worker's heartbeat ---------------------------------


def _queue(s: Settings) -> CeleryQueue:
    return CeleryQueue(celery, s.audit_queue, s.callback_queue)


def requeue_orphans(s: Settings | None = None) -> list[uuid.UUID]:
    """One reconciler pass; returns the audits it sent again (``cdi admin requeue-orphans``)."""
    report = reconcile_once(s)
    return report.requeued + report.sent


def reconcile_once(s: Settings | None = None) -> ReconcileReport:
    s = s or settings()
    return reconcile(session_factory(s.database_url), s, open_blob_store(s), _queue(s))


@celery.task(name=RECONCILE, ignore_result=True)
def reconcile_task() -> dict[str, int]:
    """The reconciler as a periodic task (Celery beat, server mode)."""
    return reconcile_once().as_dict()


_loop_stop = threading.Event()


def _embedded(s: Settings) -> bool:
    """The embedded mode (no beat process): the worker runs the reconciler itself."""
    return not s.broker_url.startswith(("redis://", "rediss://"))


@worker_init.connect
def _check_blob_store(**_: Any) -> None:
    """A worker that cannot reach the blobs (missing bucket, wrong credentials) stops at once."""
    s = settings()
    try:
        open_blob_store(s).check()
    except BlobStoreUnavailable as exc:
        log.critical("cannot start: %s", exc)
        raise SystemExit(f"cdi worker: {exc}") from None


@worker_ready.connect
def _start_loop(sender: Any = None, **_: Any) -> None:
    s = settings()
    name = getattr(sender, "hostname", None) or f"worker@{uuid.uuid4().hex[:8]}"
    factory = session_factory(s.database_url)
    run_reconciler = _embedded(s)

    def loop() -> None:
        last = 0.0
        while not _loop_stop.is_set():
            try:
                beat(factory, name)
            except Exception:
                log.warning("could not record this worker's heartbeat", exc_info=True)
            if run_reconciler and time.monotonic() - last >= min(s.reconcile_interval, max(2.0, s.lease_seconds / 2)):
                last = time.monotonic()
                try:
                    reconcile_once(s)
                except Exception:
                    log.exception("the reconciler failed; it will run again")
            _loop_stop.wait(min(s.worker_heartbeat_seconds, 5.0))
        with contextlib.suppress(Exception):
            forget(factory, name)

    threading.Thread(target=loop, name="cdi-worker-loop", daemon=True).start()
    log.info("worker ready", extra={"queues": [s.audit_queue, s.callback_queue], "started": utcnow().isoformat(),
                                    "reconciler": "in this worker" if run_reconciler else "celery beat"})


@worker_shutdown.connect
def _stop_loop(**_: Any) -> None:
    _loop_stop.set()
