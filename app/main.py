"""The FastAPI application. ``uvicorn app.main:create_app --factory`` serves it.

The API process never imports torch: it validates uploads, reads and writes the database
and queues work; the workers (:mod:`worker`) do everything that touches a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from app import __version__
from app.api import errors
from app.api.deps import no_unknown_query
from app.api.routes import audits, callbacks, explain, health, models, plans, retention, rules, web
from app.queue import AuditQueue, CeleryQueue, make_celery
from app.quotas import AddressThrottle, RateLimiter, UploadSlots, open_buckets
from app.settings import Settings
from app.spool import clean_spool
from app.storage.blobs import open_blob_store
from app.storage.db import session_factory


def create_app(settings: Settings | None = None, queue: AuditQueue | None = None) -> FastAPI:
    settings = settings or Settings()
    if queue is None:
        queue = CeleryQueue(make_celery(settings), settings.audit_queue, settings.callback_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.upload_tmp_dir.mkdir(parents=True, exist_ok=True)
        # A missing bucket or folder stops the start with its reason, not the first upload.
        app.state.blobs.check()
        clean_spool(settings)  # what uploads cut short by a dead API process left behind
        yield

    app = FastAPI(
        title="CDI audit service",
        version=__version__,
        summary="Was a diffusion model trained on your images? Submit them, get a verdict with a p-value.",
        lifespan=lifespan,
        # Served by app.api.routes.web from installed files: the defaults load them from a CDN.
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(no_unknown_query)],
    )
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.database_url)
    app.state.blobs = open_blob_store(settings)
    app.state.queue = queue
    buckets = open_buckets(settings)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, buckets=buckets)
    # Added last, so it runs first: a request is counted against its address before any other
    # work, authentication included.
    app.add_middleware(AddressThrottle, limiter=RateLimiter(settings.address_rate_limit_per_minute,
                                                            buckets=buckets, scope="address"))
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(audits.router, prefix="/v1")
    app.include_router(explain.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
    app.include_router(plans.router, prefix="/v1")
    app.include_router(callbacks.router, prefix="/v1")
    app.include_router(retention.router, prefix="/v1")
    app.include_router(rules.router, prefix="/v1")
    web.install(app)
    _describe_models(app)
    return app


def _describe_models(app: FastAPI) -> None:
    """The OpenAPI document names the model ids this deployment accepts (GET /v1/models) as the
    submit form's enumeration, read from the registry on each request of the document (a model
    registered since appears at once)."""
    import copy

    from app.registry import ModelRegistry

    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = copy.deepcopy(build())
        try:
            with app.state.session_factory() as session:
                ids = [m.id for m in ModelRegistry(session, app.state.settings).list()]
        except Exception:  # the database is down: the document without the list
            return schema
        form = (schema.get("paths", {}).get("/v1/audits", {}).get("post", {}).get("requestBody", {})
                .get("content", {}).get("multipart/form-data", {}).get("schema", {}))
        for name in ("model", "reference_model"):
            prop = form.get("properties", {}).get(name)
            if prop is not None and ids:
                prop["enum"] = ids
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
