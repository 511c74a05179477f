"""The data owner's web page at ``/`` and the API documentation at ``/docs`` and ``/redoc``.

Everything is served from this process: the page's files from ``app/web/static`` (plain
HTML, CSS and JavaScript, no build step), and Swagger UI's and ReDoc's files from the
installed ``fastapi-offline`` package, so the documentation renders on a host with no
internet access.
"""

from __future__ import annotations

import secrets
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)

WEB_DIR = Path(str(files("app.web") / "static"))
#: A strict policy: the page loads nothing from elsewhere, and runs no inline script.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def docs_csp(nonce: str) -> str:
    """The documentation pages' policy: their files from here, their one inline script by nonce,
    nothing from elsewhere (ReDoc's sidebar logo, which it would fetch from a CDN, is refused),
    never framed."""
    return (f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def _hardened(page: HTMLResponse) -> HTMLResponse:
    """``page`` with a nonce on its inline scripts and the headers of a page that loads nothing
    from elsewhere and cannot be framed."""
    nonce = secrets.token_urlsafe(16)
    body = bytes(page.body).decode("utf-8").replace("<script>", f'<script nonce="{nonce}">')
    return HTMLResponse(body, headers={"Content-Security-Policy": docs_csp(nonce), "X-Frame-Options": "DENY",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                                       "Cache-Control": "no-cache"})


def docs_assets_dir() -> Path | None:
    """The folder of Swagger UI's and ReDoc's files shipped by ``fastapi-offline``, if installed."""
    try:
        import fastapi_offline
    except ModuleNotFoundError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if folder.is_dir() else None


#: The sidebar logo ReDoc's bundle would fetch from its makers' CDN on every visit.
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def _redoc_bundle(path: Path) -> bytes:
    """ReDoc's bundle with its CDN logo replaced by an empty ``data:`` URL, so the page asks
    nothing of another host (ReDoc hides the logo when it fails to load)."""
    return path.read_bytes().replace(REDOC_CDN_LOGO, b"data:,")


@router.get("/", response_class=HTMLResponse)
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def install(app: FastAPI) -> None:
    """Mount the page, its files and the offline API docs on ``app`` (built with docs_url=None)."""
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    assets = docs_assets_dir()
    title = app.title
    openapi_url = app.openapi_url or "/openapi.json"
    if assets is None:
        message = ("<p>The API documentation needs the <code>fastapi-offline</code> package (the service's "
                   f"extra). The API's description is at <a href='{openapi_url}'>{openapi_url}</a>.</p>")

        @app.get("/docs", include_in_schema=False)
        def docs_missing() -> HTMLResponse:
            return HTMLResponse(message, status_code=503)

        return
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return _hardened(get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title}: API documentation",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        ))

    redoc_js = _redoc_bundle(assets / "redoc.standalone.js")

    @app.get("/docs-local/redoc.standalone.js", include_in_schema=False)
    def redoc_bundle() -> Response:
        return Response(redoc_js, media_type="text/javascript",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"})

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return _hardened(get_redoc_html(
            openapi_url=openapi_url, title=f"{title}: API reference",
            redoc_js_url="/docs-local/redoc.standalone.js", redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        ))
