"""The Celery application, configured from :class:`app.settings.Settings`.

Importing this module loads no task code and no torch (the API imports it to send tasks by
name); the worker process imports :mod:`worker.tasks` through ``include``.

Delivery guarantees: tasks are acknowledged *after* they finish (``acks_late``); a task
whose worker process dies is rejected and requeued (``reject_on_worker_lost``); a worker
killed outright leaves its message unacknowledged, and Redis hands it to another worker
after the visibility timeout. A task that fails with an error is acknowledged (it has
recorded the failure in the database; running it again would fail again).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from app.settings import Settings, get_settings


def celery_config(settings: Settings) -> dict[str, Any]:
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
            "worker.tasks.run_audit": {"queue": settings.audit_queue},
            "worker.tasks.run_shard": {"queue": settings.audit_queue},
            "worker.tasks.deliver_callback": {"queue": settings.callback_queue},
            "worker.tasks.reconcile": {"queue": settings.callback_queue},
        },
        "worker_send_task_events": False,
        # The reconciler (app.reconcile), for `celery beat` in server mode; the embedded
        # worker runs it in a loop of its own instead.
        "beat_schedule": {
            "cdi-reconcile": {"task": "worker.tasks.reconcile", "schedule": settings.reconcile_interval,
                              "options": {"queue": settings.callback_queue, "expires": settings.reconcile_interval}},
        },
        "enable_utc": True,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("cdi", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.cdi_settings = settings
    return app


#: The worker's application (``celery -A worker.celery_app worker``), built from the environment.
celery = make_celery()
