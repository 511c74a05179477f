"""A Python client of the audit service's HTTP API (httpx).

>>> client = CdiClient("http://127.0.0.1:8000", api_key="cdi_…")
>>> audit = client.submit(model="digits-memorised", archive="demo.zip")
>>> status = client.wait(audit["id"])
>>> client.report(audit["id"])["verdict"]

Every error the service answers becomes a :class:`ServiceError` carrying its stable
``code``; transport failures are :class:`TransportError`, whose message names the URL and
how to start the service. This module imports httpx only: it works where torch is not
installed (``pip install httpx`` and this file are enough). The transport is injectable
(``transport=httpx.MockTransport(...)`` or ``httpx.ASGITransport(app)``), so tests need
no patching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = ["FINAL_STATES", "CdiClient", "ClientError", "ServiceError", "TransportError"]

FINAL_STATES = frozenset({"done", "failed", "cancelled"})


class ClientError(Exception):
    """Base class of the client's errors."""


class TransportError(ClientError):
    """The service could not be reached, or its answer could not be read."""


class ServiceError(ClientError):
    """The service answered with an error: ``status`` (HTTP), ``code`` (stable), ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


PathOrFile = str | Path | IO[bytes]


class CdiClient:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"User-Agent": "cdi-audit-client/1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CdiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise TransportError(
                f"cannot connect to the CDI service at {self.base_url} ({exc}). Is it running? Start it with "
                f"`scripts/run` (or `cdi serve`) on that machine, or give the URL of a running service with "
                f"--url or CDI_URL.") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {self.base_url}{url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = f"http_{response.status_code}", response.text[:500]
            raise ServiceError(response.status_code, code, message)
        return response

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._request(method, url, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise TransportError(f"{method} {url}: the answer is not JSON") from exc

    # --- the API ----------------------------------------------------------------------------

    def submit(self, *, model: str, archive: PathOrFile | None = None, published: PathOrFile | None = None,
               unpublished: PathOrFile | None = None, captions: PathOrFile | None = None,
               labels: PathOrFile | None = None, alpha: float | None = None, protocol: str | None = None,
               features: str | None = None, seed: int | None = None,
               callback_url: str | None = None, reference_model: str | None = None,
               precision: str | None = None, batch_size: int | str | None = None,
               sequential: bool | None = None, looks: int | None = None, spending: str | None = None,
               futility: bool | None = None) -> dict[str, Any]:
        """Upload one ``archive`` (or ``published`` and ``unpublished`` zips); the files stream."""
        if (archive is None) == (published is None or unpublished is None):
            raise ValueError("give either archive, or both published and unpublished")
        data: dict[str, str] = {"model": model}
        options: dict[str, object] = {"alpha": alpha, "protocol": protocol, "features": features, "seed": seed,
                                      "callback_url": callback_url, "reference_model": reference_model,
                                      "precision": precision, "batch_size": batch_size, "looks": looks,
                                      "spending": spending}
        data.update({k: str(v) for k, v in options.items() if v is not None})
        data.update({k: str(v).lower() for k, v in (("sequential", sequential), ("futility", futility))
                     if v is not None})
        uploads: dict[str, PathOrFile | None] = {"archive": archive, "published": published,
                                                 "unpublished": unpublished, "captions": captions,
                                                 "labels": labels}
        with ExitStack() as stack:
            files: dict[str, tuple[str, IO[bytes]]] = {}
            for key, upload in uploads.items():
                if upload is not None:
                    files[key] = stack.enter_context(_opened(upload))
            return dict(self._json("POST", "/v1/audits", data=data, files=files))

    def status(self, audit_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/audits/{audit_id}"))

    def list_audits(self, *, limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if limit is not None:
            params["limit"] = limit
        if cursor is not None:
            params["cursor"] = cursor
        return dict(self._json("GET", "/v1/audits", params=params))

    def iter_audits(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            page = self.list_audits(limit=page_size, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def report(self, audit_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/audits/{audit_id}/report"))

    def report_pdf(self, audit_id: str) -> bytes:
        return self._request("GET", f"/v1/audits/{audit_id}/report.pdf").content

    def cancel(self, audit_id: str) -> dict[str, Any]:
        """Cancel the audit if it has not ended, and delete its uploaded images."""
        return dict(self._json("DELETE", f"/v1/audits/{audit_id}"))

    def models(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/models")["items"])

    def register_model(self, model_id: str, source: str, revision: str | None = None,
                       description: str = "") -> dict[str, Any]:
        body = {"id": model_id, "source": source, "revision": revision, "description": description}
        return dict(self._json("PUT", f"/v1/models/{model_id}", json=body))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait(self, audit_id: str, *, poll: float = 2.0, timeout: float | None = None,
             on_status: Callable[[dict[str, Any]], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        """Poll until the audit ends; returns its final status (raises TimeoutError after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(audit_id)
            if on_status is not None:
                on_status(status)
            if status["state"] in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"audit {audit_id} is still {status['state']} after {timeout} s")
            sleep(poll)


@contextmanager
def _opened(value: PathOrFile) -> Iterator[tuple[str, IO[bytes]]]:
    if isinstance(value, str | Path):
        path = Path(value)
        with path.open("rb") as f:
            yield path.name, f
    else:
        yield getattr(value, "name", "upload"), value
