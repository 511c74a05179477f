"""How the API hands work to the workers, without importing the worker's code (or torch).

The Celery application is built here, from the settings (:func:`make_celery`); tasks are
sent by name; :mod:`worker.tasks` defines them. Tests can pass another
:class:`AuditQueue`. Cancelling needs no broker message: a worker checks the audit's state
when it picks the task up and at every heartbeat.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Protocol

from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

RUN_AUDIT = "worker.tasks.run_audit"
#: One shard of a sharded audit's feature extraction (sent by the worker that split the audit).
RUN_SHARD = "worker.tasks.run_shard"
DELIVER_CALLBACK = "worker.tasks.deliver_callback"
RECONCILE = "worker.tasks.reconcile"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration, built from the service's settings.

    Delivery guarantees: tasks are acknowledged *after* they finish (``acks_late``); a task
    whose worker process dies is rejected and requeued (``reject_on_worker_lost``); a worker
    killed outright leaves its message unacknowledged, and Redis hands it to another worker
    after the visibility timeout. A task that fails with an error is acknowledged (it has
    recorded the failure in the database; running it again would fail again).
    """
    from kombu import Exchange, Queue

    transport_options: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis", "rediss")):
        transport_options["visibility_timeout"] = settings.broker_visibility_timeout
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # State lives in the service's database; Celery's result backend is not used.
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # One audit at a time per worker process: a prefetched second audit would wait
        # hours behind the first instead of going to an idle worker.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_pool": settings.worker_pool,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.audit_queue,
        # Each queue on its own exchange: left to the defaults, both would bind to the default
        # queue's exchange and key, and a callback message would land in the audit queue too.
        "task_queues": tuple(Queue(q, Exchange(q, type="direct"), routing_key=q)
                             for q in (settings.audit_queue, settings.callback_queue)),
        "task_default_exchange": settings.audit_queue,
        "task_default_routing_key": settings.audit_queue,
        "task_routes": {
            RUN_AUDIT: {"queue": settings.audit_queue},
            RUN_SHARD: {"queue": settings.audit_queue},
            DELIVER_CALLBACK: {"queue": settings.callback_queue},
            RECONCILE: {"queue": settings.callback_queue},
        },
        "worker_send_task_events": False,
        # The reconciler (app.reconcile), for `celery beat` in server mode; the embedded
        # worker runs it in a loop of its own instead.
        "beat_schedule": {
            "cdi-reconcile": {"task": RECONCILE, "schedule": settings.reconcile_interval,
                              "options": {"queue": settings.callback_queue, "expires": settings.reconcile_interval}},
        },
        "enable_utc": True,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    """The Celery application: the API sends tasks by name with it, the worker runs them.

    It loads no task code and no torch; a worker process imports :mod:`worker.tasks` by
    name, through ``include``.
    """
    from celery import Celery

    settings = settings or get_settings()
    app = Celery("cdi", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.cdi_settings = settings
    return app


class AuditQueue(Protocol):
    def enqueue(self, audit_id: uuid.UUID) -> None: ...

    def enqueue_callback(self, audit_id: uuid.UUID) -> None: ...

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""


class CeleryQueue:
    def __init__(self, celery_app: object, audit_queue: str, callback_queue: str) -> None:
        from celery import Celery

        assert isinstance(celery_app, Celery)
        self.celery = celery_app
        self.audit_queue = audit_queue
        self.callback_queue = callback_queue

    def enqueue(self, audit_id: uuid.UUID) -> None:
        # The task id is the audit id: revoking, and reading the broker, need no lookup table.
        self.celery.send_task(RUN_AUDIT, args=[str(audit_id)], task_id=str(audit_id), queue=self.audit_queue)

    def enqueue_shard(self, audit_id: uuid.UUID, shard: int) -> None:
        self.celery.send_task(RUN_SHARD, args=[str(audit_id), shard], task_id=f"{audit_id}:{shard}",
                              queue=self.audit_queue)

    def enqueue_callback(self, audit_id: uuid.UUID) -> None:
        self.celery.send_task(DELIVER_CALLBACK, args=[str(audit_id)], queue=self.callback_queue)

    def ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def pending_ids(self) -> set[str] | None:
        """Task ids waiting in the audit queue or held unacknowledged by a worker (Redis only;
        ``None`` where the broker cannot be inspected). The reconciler compares them with the
        queued audits to find the tasks a broker lost."""
        import json

        url = str(self.celery.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        ids: set[str] = set()
        with self.celery.connection_for_read() as conn:
            client = conn.default_channel.client
            for raw in client.lrange(self.audit_queue, 0, -1):
                ids.add(str(json.loads(raw).get("headers", {}).get("id")))
            for raw in client.hvals("unacked"):
                message = json.loads(raw)[0]
                ids.add(str(message.get("headers", {}).get("id")))
        return ids
