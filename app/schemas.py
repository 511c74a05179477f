"""The JSON shapes of the API (the wire format clients rely on; docs/service.md)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.storage.models import Audit

State = Literal["queued", "validating", "extracting", "scoring", "reporting", "done", "failed", "cancelled"]
STATES: tuple[str, ...] = State.__args__  # type: ignore[attr-defined]


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What went wrong, for people.")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Progress(BaseModel):
    stage: str | None = Field(description="The stage the counts refer to (the library's stage name).")
    done: int
    total: int


class AuditLinks(BaseModel):
    self: str
    report: str
    report_pdf: str


def public_options(options: dict[str, Any]) -> dict[str, Any]:
    """The audit's options as its status shows them: a reference model by its registered id
    (where a worker finds its weights is the deployment's business)."""
    out = dict(options)
    ref = out.get("reference_model")
    if isinstance(ref, dict):
        out["reference_model"] = {"id": ref.get("id")}
    return out


class AuditStatus(BaseModel):
    """An audit's state. ``error`` is present when ``state`` is ``failed``."""

    model_config = ConfigDict(protected_namespaces=())

    id: uuid.UUID
    state: State
    progress: Progress
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    model: str
    options: dict[str, Any]
    n_published: int
    n_unpublished: int
    callback_url: str | None = None
    verdict: str | None = Field(default=None, description="Set when done: used, not_detected or inconclusive.")
    p_value: float | None = Field(default=None, description="Set when done.")
    error: ErrorInfo | None = None
    images_deleted: bool = False
    retain_images: bool = Field(default=False, description="The images are kept after the audit ends.")
    deleted_at: datetime | None = Field(default=None, description="Set when its owner deleted it.")
    urls: AuditLinks

    @classmethod
    def of(cls, audit: Audit, base: str = "/v1/audits") -> AuditStatus:
        url = f"{base}/{audit.id}"
        return cls(
            id=audit.id, state=audit.state,  # type: ignore[arg-type]
            progress=Progress(stage=audit.progress_stage, done=audit.progress_done, total=audit.progress_total),
            created_at=audit.created_at, updated_at=audit.updated_at, started_at=audit.started_at,
            finished_at=audit.finished_at, model=audit.model_id, options=public_options(audit.options),
            n_published=audit.n_published, n_unpublished=audit.n_unpublished, callback_url=audit.callback_url,
            verdict=audit.verdict, p_value=audit.p_value,
            error=ErrorInfo(code=audit.error_code, message=audit.error_message or "")
            if audit.error_code else None,
            images_deleted=audit.images_deleted, retain_images=bool(audit.retain_images),
            deleted_at=audit.deleted_at,
            urls=AuditLinks(self=url, report=f"{url}/report", report_pdf=f"{url}/report.pdf"),
        )


class Removed(BaseModel):
    images: int = Field(description="Image records removed (their files, unless another audit uses them).")
    blobs: int = Field(description="Stored files deleted (images no other audit uses, the PDF).")
    report: int = Field(description="1 if a JSON report was deleted.")
    pdf: int = Field(description="1 if a PDF report was deleted.")
    runs: int = Field(description="Run records deleted.")
    features: int = Field(description="Cached per-image feature vectors deleted (none that another audit uses).")


class AuditDeleted(AuditStatus):
    removed: Removed


class AuditAccepted(BaseModel):
    id: uuid.UUID
    state: State
    urls: AuditLinks


class AuditPage(BaseModel):
    items: list[AuditStatus]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on the last.")


class ModelOut(BaseModel):
    id: str
    family: str | None
    conditioning: str | None
    description: str
    revision: str | None
    origin: Literal["zoo", "registered"]


class ModelList(BaseModel):
    items: list[ModelOut]


class RegisterModel(BaseModel):
    id: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, description=(
        "A diffusers directory on this host (and at the same path on every worker). A hub id is refused "
        "here (422 `hub_model_via_cli`): finding its family downloads its configuration, which the API "
        "never does inside a request; register it with `cdi admin register-model ID HUB_ID --revision REV`. "
        "A model published in parts (one checkpoint file and its configs, or a UNet/transformer file on a "
        "base model) is a directory holding a cdi_model.json that names them."))
    revision: str | None = None
    description: str = ""

    @field_validator("id", "source", "revision", "description")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain a NUL byte")
        return value


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}
