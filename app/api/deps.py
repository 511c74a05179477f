"""Request dependencies, as ``Annotated`` aliases: settings, sessions, the caller, the audit."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import errors as E
from app.errors import BadInput, Forbidden, NotFound, Unauthorized
from app.queue import AuditQueue
from app.quotas import RateLimiter
from app.services import AuditService
from app.settings import Settings
from app.storage.blobs import BlobStore
from app.storage.models import Audit
from app.storage.repositories import ApiKeyRepository, AuditRepository

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer cdi_…`")


def no_unknown_query(request: Request) -> None:
    """Refuse query parameters the operation does not define: a misspelt ``?limt=`` would
    otherwise be ignored in silence (the same rule as unknown form fields)."""
    raw = request.url.query
    if not raw:
        return
    if any(pair and not pair.split("=", 1)[0] for pair in raw.split("&")):
        raise BadInput("a query parameter has no name", E.UNKNOWN_PARAMETER)
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    todo = [dependant]
    while todo:  # the operation's own parameters and its dependencies'
        d = todo.pop()
        known |= {p.alias for p in d.query_params}
        todo.extend(d.dependencies)
    unknown = sorted(k for k in request.query_params if k not in known)
    if unknown:
        raise BadInput(f"unknown query parameter {unknown[0]!r}"
                       + (f"; this operation takes {', '.join(sorted(known))}" if known else ""),
                       E.UNKNOWN_PARAMETER)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session_factory(request: Request) -> Callable[[], Session]:
    return request.app.state.session_factory


SessionFactoryDep = Annotated[Callable[[], Session], Depends(get_session_factory)]


def get_session(factory: SessionFactoryDep) -> Iterator[Session]:
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]


def get_queue(request: Request) -> AuditQueue:
    return request.app.state.queue


QueueDep = Annotated[AuditQueue, Depends(get_queue)]


def get_audit_service(factory: SessionFactoryDep, settings: SettingsDep, blobs: BlobsDep,
                      queue: QueueDep) -> AuditService:
    return AuditService(factory, settings, blobs, queue)


AuditServiceDep = Annotated[AuditService, Depends(get_audit_service)]


@dataclass(frozen=True)
class Caller:
    """The authenticated tenant (detached from any session: uploads are long)."""

    tenant_id: uuid.UUID
    tenant_name: str
    is_admin: bool


def current_caller(
    request: Request,
    factory: SessionFactoryDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The key's tenant; each call also counts against the tenant's request rate."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'", E.MISSING_API_KEY)
    with factory() as session:
        keys = ApiKeyRepository(session)
        tenant = keys.authenticate(credentials.credentials)
        if tenant is None:
            raise Unauthorized("the API key is not valid (unknown, revoked or malformed)", E.INVALID_API_KEY)
        caller = Caller(tenant.id, tenant.name, tenant.is_admin)
        if keys.touch(credentials.credentials):
            session.commit()
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        limiter.take(caller.tenant_id)
    return caller


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def admin_caller(caller: CurrentCaller) -> Caller:
    if not caller.is_admin:
        raise Forbidden("this needs an admin tenant's key", "admin_only")
    return caller


AdminCaller = Annotated[Caller, Depends(admin_caller)]


def caller_audit(audit_id: str, caller: CurrentCaller, session: SessionDep) -> Audit:
    """The caller's audit; another tenant's id (or no such id) answers 404 alike."""
    try:
        ident = uuid.UUID(audit_id)
    except ValueError:
        raise NotFound(f"no audit {audit_id!r}", "audit_not_found") from None
    audit = AuditRepository(session).get_for_tenant(ident, caller.tenant_id)
    if audit is None:
        raise NotFound(f"no audit {audit_id!r}", "audit_not_found")
    return audit


CallerAudit = Annotated[Audit, Depends(caller_audit)]
