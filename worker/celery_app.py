"""The worker's Celery application (``celery -A worker.celery_app:celery worker``).

Built by :func:`app.queue.make_celery` from the environment's settings; the API builds its
own with the same function and never imports this package.
"""

from __future__ import annotations

from app.queue import make_celery

celery = make_celery()
