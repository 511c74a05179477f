"""How the API hands work to the workers, without importing the worker's code (or torch).

Tasks are sent by name; :mod:`worker.tasks` defines them. Tests can pass another
:class:`AuditQueue`. Cancelling needs no broker message: a worker checks the audit's state
when it picks the task up and at every heartbeat.
"""

from __future__ import annotations

import uuid
from typing import Protocol

RUN_AUDIT = "worker.tasks.run_audit"
#: One shard of a sharded audit's feature extraction (sent by the worker that split the audit).
RUN_SHARD = "worker.tasks.run_shard"
DELIVER_CALLBACK = "worker.tasks.deliver_callback"
RECONCILE = "worker.tasks.reconcile"


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
