"""/v1/audits: submit, poll, list, fetch reports, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app import errors as E
from app.api.deps import AuditServiceDep, BlobsDep, CallerAudit, CurrentCaller, SessionDep, SettingsDep
from app.api.multipart import read_form
from app.errors import BadInput, Conflict
from app.forms import form_schema
from app.schemas import (
    STATES,
    AuditAccepted,
    AuditDeleted,
    AuditPage,
    AuditStatus,
    ErrorResponse,
)
from app.services import FILE_FIELDS, TEXT_FIELDS
from app.storage.blobs import BlobNotFound
from app.storage.repositories import AuditRepository, InvalidCursor

router = APIRouter(prefix="/audits", tags=["audits"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    404: {"model": ErrorResponse, "description": "No such audit for this tenant."},
}


@router.post(
    "",
    status_code=202,
    response_model=AuditAccepted,
    summary="Submit an audit",
    responses={**_ERRORS, 413: {"model": ErrorResponse, "description": "A configured limit was exceeded."},
               422: {"model": ErrorResponse, "description": "Bad input; `error.code` names the problem."},
               429: {"model": ErrorResponse, "description": "A quota or rate limit was reached; see Retry-After."},
               503: {"model": ErrorResponse, "description": "The work queue or the database is unreachable."}},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"multipart/form-data": {"schema": form_schema()}}}},
)
async def submit_audit(request: Request, caller: CurrentCaller, settings: SettingsDep,
                       service: AuditServiceDep) -> JSONResponse:
    """Upload the images (streamed to disk), validate everything, and queue the audit."""
    await run_in_threadpool(service.quotas.check_submit, caller.tenant_id)
    with request.app.state.upload_slots.hold(caller.tenant_id):
        return await _submit(request, caller, settings, service)


async def _submit(request: Request, caller: CurrentCaller, settings: SettingsDep,
                  service: AuditServiceDep) -> JSONResponse:
    form = await read_form(
        request.headers.get("content-type"), request.stream(), tmp_dir=settings.upload_tmp_dir,
        file_fields=FILE_FIELDS, text_fields=TEXT_FIELDS, max_body_bytes=settings.max_upload_bytes,
        file_limits={
            "captions": (settings.max_captions_bytes, E.CAPTIONS_TOO_LARGE, "the captions file"),
            "labels": (settings.max_captions_bytes, E.CAPTIONS_TOO_LARGE, "the labels file"),
        },
    )
    try:
        audit = await run_in_threadpool(service.submit, caller.tenant_id, form)
    finally:
        form.cleanup()
    status = AuditStatus.of(audit)
    body = AuditAccepted(id=audit.id, state=status.state, urls=status.urls)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": status.urls.self})


@router.get("", response_model=AuditPage, responses=_ERRORS, summary="List the caller's audits")
def list_audits(
    caller: CurrentCaller, session: SessionDep, settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: Annotated[str | None, Query(
        max_length=200, description="The `next_cursor` of the previous page (opaque; any other value answers "
                                    "422 `invalid_cursor`).",
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]+$"})] = None,
    state: Annotated[str | None, Query(max_length=20, description="Only audits in this state.",
                                       json_schema_extra={"enum": list(STATES)})] = None,
) -> AuditPage:
    """Newest first; follow ``next_cursor`` for the next page."""
    if state is not None and state not in STATES:
        raise BadInput(f"state must be one of {', '.join(STATES)}", E.INVALID_STATE)
    try:
        page = AuditRepository(session).list_for_tenant(
            caller.tenant_id, limit=limit or settings.default_page_size, cursor=cursor, state=state)
    except InvalidCursor:
        raise BadInput("the cursor is not one this API gave", E.INVALID_CURSOR) from None
    return AuditPage(items=[AuditStatus.of(a) for a in page.items], next_cursor=page.next_cursor)


@router.get("/{audit_id}", response_model=AuditStatus, responses=_ERRORS, summary="An audit's state")
def get_audit(audit: CallerAudit) -> AuditStatus:
    return AuditStatus.of(audit)


def require_done(audit: Any) -> None:
    if audit.deleted_at is not None:
        raise Conflict("the audit was deleted, and its report with it", "audit_deleted")
    if audit.state == "done":  # the report itself is not loaded here (a deferred column)
        return
    if audit.state == "failed":
        raise Conflict(f"the audit failed ({audit.error_code}): it has no report", "audit_failed")
    if audit.state == "cancelled":
        raise Conflict("the audit was cancelled: it has no report", "audit_cancelled")
    raise Conflict(f"the audit is {audit.state}: its report is not ready", "report_not_ready")


@router.get(
    "/{audit_id}/report", responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "Not done."}},
    summary="The report (JSON)",
)
def get_report(audit: CallerAudit) -> JSONResponse:
    """The library's report (``verdict`` and ``p_value`` at the top level) plus a ``service`` block."""
    require_done(audit)
    if audit.report is None:
        raise Conflict("the audit is done but its report is not stored", "report_not_ready")
    report = dict(audit.report)
    report["service"] = {"audit_id": str(audit.id), "model": audit.model_id, "options": audit.options,
                         "created_at": audit.created_at.isoformat(),
                         "finished_at": audit.finished_at.isoformat() if audit.finished_at else None}
    return JSONResponse(report)


@router.get(
    "/{audit_id}/report.pdf",
    responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "Not done."},
               200: {"content": {"application/pdf": {}}, "description": "The report as PDF."}},
    response_class=Response, summary="The report (PDF)",
)
def get_report_pdf(audit: CallerAudit, blobs: BlobsDep) -> Response:
    require_done(audit)
    if audit.report_pdf_sha256 is None:
        raise Conflict("the report has no PDF", "report_not_ready")
    try:
        chunks = blobs.iter_chunks(audit.report_pdf_sha256)
    except BlobNotFound:
        raise Conflict("the report's PDF is missing from storage", "report_missing") from None
    # Streamed from the store (a local file or an S3 object), never read whole into memory.
    return StreamingResponse(chunks, media_type="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="cdi-audit-{audit.id}.pdf"'})


@router.delete("/{audit_id}", response_model=AuditDeleted, responses=_ERRORS,
               summary="Cancel, and delete everything the audit stored")
def delete_audit(audit: CallerAudit, session: SessionDep, service: AuditServiceDep) -> AuditDeleted:
    """Cancel a queued or running audit, and delete its images, report, PDF, run records and the
    cached features of its images that no other audit uses. ``removed`` counts what went; the
    audit's id keeps answering, with ``deleted_at`` set."""
    audit, removed = service.delete(session, audit)
    return AuditDeleted(**AuditStatus.of(audit).model_dump(), removed=removed)  # type: ignore[arg-type]
