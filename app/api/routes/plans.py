"""/v1/plans: how many images an audit needs, from a pilot audit or an earlier report."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.deps import CurrentCaller, SessionDep
from app.errors import BadInput, Conflict, NotFound
from app.schemas import ErrorResponse
from app.storage.repositories import AuditRepository

router = APIRouter(prefix="/plans", tags=["plans"])


class PlanRequest(BaseModel):
    """The pilot: one of the caller's finished audits, or a report (JSON) from anywhere."""

    # Exactly one pilot, as the validator below requires.
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["audit_id"]}, {"required": ["report"]}]})

    audit_id: uuid.UUID | None = Field(default=None, description="a finished audit of the caller: its images "
                                                                  "are the pilot")
    report: dict[str, Any] | None = Field(default=None, description="a cdi-report/1 document: its images are "
                                                                     "the pilot")
    alpha: float = Field(default=0.01, gt=0.0, lt=0.5, description="significance level of the planned audit")
    power: float = Field(default=0.9, gt=0.0, lt=1.0, description="power to plan for")
    u_ratio: float | None = Field(default=None, gt=0.0, le=1000.0,
                                  description="unpublished images per published image (default: the pilot's)")

    @model_validator(mode="after")
    def _one_pilot(self) -> PlanRequest:
        if (self.audit_id is None) == (self.report is None):
            raise ValueError("give exactly one of audit_id and report")
        return self


class PlanResponse(BaseModel):
    n_per_set: int | None = Field(description="published images needed (null: not reachable)")
    n_unpublished: int | None = Field(description="unpublished images needed alongside")
    additional_published: int | None = Field(description="published images beyond the pilot's")
    interval: list[int | None] = Field(description="percentile interval of n_per_set from the pilot's sampling "
                                                   "error (null bound: not reachable)")
    confidence: float
    power: float
    alpha: float
    power_now: float = Field(description="estimated power at the pilot's own sizes")
    n_pilot_p: int
    n_pilot_u: int
    effects: dict[str, float] = Field(description="strongest standardised differences (P more member-like)")
    summary: str


@router.post(
    "", response_model=PlanResponse, summary="Plan an audit's size",
    responses={400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
               401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
               404: {"model": ErrorResponse, "description": "No such audit for this tenant."},
               409: {"model": ErrorResponse, "description": "The audit has no report yet."},
               422: {"model": ErrorResponse, "description": "Bad input; `error.code` names the problem."},
               429: {"model": ErrorResponse, "description": "Rate limited; see `Retry-After`."}},
)
async def create_plan(body: PlanRequest, caller: CurrentCaller, session: SessionDep) -> PlanResponse:
    """Images per set for the requested power at α, with its uncertainty (``cdi plan``)."""
    from cdi.errors import CdiError
    from cdi.report import plan_from_report
    from cdi.report.errors import ReportFormatError

    document = body.report
    if body.audit_id is not None:
        audit = AuditRepository(session).get_for_tenant(body.audit_id, caller.tenant_id)
        if audit is None:
            raise NotFound(f"no audit {body.audit_id}", "audit_not_found")
        if audit.state != "done" or audit.report is None:
            raise Conflict(f"the audit is {audit.state}: it has no report to plan from", "report_not_ready")
        document = audit.report
    assert document is not None  # the request holds exactly one of audit_id and report
    try:
        plan = await run_in_threadpool(plan_from_report, document, alpha=body.alpha, power=body.power,
                                       u_ratio=body.u_ratio, bootstraps=100)
    except ReportFormatError as exc:
        raise BadInput(f"the report is not a valid cdi-report/1 document: {exc}", "invalid_report") from None
    except CdiError as exc:
        raise BadInput(str(exc), "invalid_plan") from None
    return PlanResponse(
        n_per_set=plan.n_per_set,
        n_unpublished=None if plan.n_per_set is None else round(plan.n_per_set * plan.u_ratio),
        additional_published=plan.additional_p, interval=list(plan.interval), confidence=plan.confidence,
        power=plan.power, alpha=plan.alpha, power_now=plan.power_now, n_pilot_p=plan.n_pilot_p,
        n_pilot_u=plan.n_pilot_u, effects=dict(plan.effects), summary=plan.summary(),
    )
