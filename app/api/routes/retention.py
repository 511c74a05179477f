"""/v1/retention: how long the caller's ended audits keep their image records, report and PDF."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app import errors as E
from app.api.deps import CurrentCaller, SessionDep, SettingsDep
from app.errors import BadInput
from app.schemas import ErrorResponse
from app.settings import Settings
from app.storage.repositories import TenantRepository

router = APIRouter(prefix="/retention", tags=["retention"])


class Retention(BaseModel):
    days: int = Field(description="days an ended audit keeps its image records, report and PDF, counted from "
                                  "its end; then they are erased as DELETE does (0: until deleted)")
    default_days: int = Field(description="the deployment's retention (CDI_RETENTION_DAYS)")
    max_days: int = Field(description="the longest retention a tenant may set (0: no limit)")
    custom: bool = Field(description="whether this tenant set its own")


class RetentionChange(BaseModel):
    model_config = {"extra": "forbid"}

    days: int | None = Field(ge=0, le=100_000, description="the tenant's retention in days (0: until deleted, "
                                                           "where the deployment allows it); null: the "
                                                           "deployment's default")


def _answer(settings: Settings, days: int | None) -> Retention:
    return Retention(days=settings.retention_days if days is None else days, default_days=settings.retention_days,
                     max_days=settings.max_retention_days, custom=days is not None)


@router.get("", response_model=Retention, responses={401: {"model": ErrorResponse}},
            summary="This tenant's retention period")
def get_retention(caller: CurrentCaller, session: SessionDep, settings: SettingsDep) -> Retention:
    tenant = TenantRepository(session).get(caller.tenant_id)
    return _answer(settings, tenant.retention_days if tenant is not None else None)


@router.put("", response_model=Retention,
            responses={400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
                       401: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                       429: {"model": ErrorResponse, "description": "Rate limited; see `Retry-After`."}},
            summary="Set this tenant's retention period (longer or shorter than the default)")
def set_retention(change: RetentionChange, caller: CurrentCaller, session: SessionDep,
                  settings: SettingsDep) -> Retention:
    days, top = change.days, settings.max_retention_days
    if days is not None and top and (days == 0 or days > top):
        raise BadInput(f"retention must be between 1 and {top} days on this deployment (CDI_MAX_RETENTION_DAYS), "
                       f"or null for the default of {settings.retention_days}", E.INVALID_OPTIONS)
    tenant = TenantRepository(session).get(caller.tenant_id)
    assert tenant is not None
    tenant.retention_days = days
    session.commit()
    return _answer(settings, days)
