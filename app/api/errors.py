"""The one place where exceptions become HTTP answers: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DisconnectionError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app import errors as E
from app.errors import (
    BadInput,
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    TooLarge,
    TooMany,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

#: Seconds a client is told to wait when the database is down.
DATABASE_RETRY_AFTER = 5

STATUS: dict[type[ServiceError], int] = {
    BadInput: 422,
    TooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
    TooMany: 429,
}


def status_of(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class RefuseNul:
    """ASGI middleware: a NUL byte (``%00``) in the path or the query answers 422 at once.

    No identifier, state or cursor of this API holds one, and Postgres cannot store one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            query = unquote_to_bytes(scope.get("query_string", b"").decode("latin-1"))
            raw = scope.get("raw_path") or b""
            if "\x00" in path or b"\x00" in query or b"%00" in raw.lower():
                response = error_response(422, E.INVALID_CHARACTERS,
                                          "the URL contains a NUL byte (%00), which no part of this API accepts")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts at this path (Starlette names only the first route's)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def install(app: FastAPI) -> None:
    app.add_middleware(RefuseNul)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 503:
            headers = {"Retry-After": "30"}
        return error_response(status, exc.code, exc.message, headers)

    @app.exception_handler(TooMany)
    async def _too_many(request: Request, exc: TooMany) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after), **exc.headers}
        return error_response(429, exc.code, exc.message, headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(DisconnectionError)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(503, E.DATABASE_UNAVAILABLE, "the database cannot be reached; try again shortly",
                              {"Retry-After": str(DATABASE_RETRY_AFTER)})

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # Values the database refuses that slipped past validation (e.g. a NUL in text on Postgres).
        log.warning("the database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
        return error_response(422, E.INVALID_CHARACTERS, "a value in the request cannot be stored "
                              "(control characters such as NUL are not accepted)")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, codes.get(exc.status_code, f"http_{exc.status_code}"),
                              str(exc.detail), headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")
