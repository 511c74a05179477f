"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import BlobsDep, QueueDep, SessionDep, SettingsDep
from app.reconcile import live_workers
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            summary="The database, the broker and the blob store are reachable, and a worker is alive",
            responses={503: {"model": Health}})
async def readyz(session: SessionDep, queue: QueueDep, settings: SettingsDep, blobs: BlobsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(lambda: session.execute(text("SELECT 1")).scalar_one())
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    if settings.ready_requires_worker and checks["database"] == "ok":
        try:
            n = await run_in_threadpool(live_workers, session, settings)
            checks["workers"] = f"ok ({n} alive)" if n else "unavailable: no worker heartbeat in the last " \
                f"{3 * settings.worker_heartbeat_seconds:g} s"
        except Exception as exc:
            checks["workers"] = f"unavailable: {type(exc).__name__}"
    try:
        await run_in_threadpool(queue.ping)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        await run_in_threadpool(blobs.check)
        checks["blobs"] = "ok"
    except Exception as exc:
        checks["blobs"] = f"unavailable: {exc}"
    ok = all(v.startswith("ok") for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
