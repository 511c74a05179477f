"""The Python client (app.client) over an injected transport: requests, errors, waiting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from app.client import CdiClient, ServiceError, TransportError


def make(handler: object) -> CdiClient:
    return CdiClient("http://cdi.test/", "cdi_key", transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


def test_submit_streams_files_and_sends_options(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK-zip-bytes")
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers["authorization"]
        seen["url"] = str(request.url)
        body = request.read()
        seen["body"] = body
        return httpx.Response(202, json={"id": "abc", "state": "queued", "urls": {}})

    with make(handler) as client:
        out = client.submit(model="m1", archive=archive, alpha=0.05, seed=3,
                            captions=io.BytesIO(b"file,caption\n"))
    assert out["id"] == "abc"
    assert seen["auth"] == "Bearer cdi_key" and seen["url"] == "http://cdi.test/v1/audits"
    body = seen["body"]
    assert isinstance(body, bytes)
    for part in (b'name="model"', b"m1", b'name="alpha"', b"0.05", b'name="seed"', b'name="archive"; filename="a.zip"',
                 b"PK-zip-bytes", b'name="captions"'):
        assert part in body
    assert b'name="protocol"' not in body  # unset options are left to the server's defaults


def test_submit_needs_one_archive_or_two() -> None:
    with make(lambda r: httpx.Response(500)) as client, pytest.raises(ValueError):
        client.submit(model="m", published="p.zip")


def test_errors_carry_the_stable_code() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"error": {"code": "zip_bomb", "message": "a.zip expands 9000-fold"}})

    with make(handler) as client, pytest.raises(ServiceError) as info:
        client.status("x")
    assert (info.value.status, info.value.code) == (422, "zip_bomb")
    assert "9000-fold" in info.value.message


def test_non_json_errors_and_transport_failures() -> None:
    with make(lambda r: httpx.Response(502, text="bad gateway")) as client, pytest.raises(ServiceError) as info:
        client.status("x")
    assert info.value.code == "http_502"

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with make(boom) as client, pytest.raises(TransportError):
        client.status("x")


def test_wait_polls_until_a_final_state() -> None:
    states = iter(["queued", "extracting", "scoring", "done"])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "a", "state": next(states)})

    sleeps: list[float] = []
    with make(handler) as client:
        final = client.wait("a", poll=0.25, sleep=sleeps.append)
    assert final["state"] == "done" and sleeps == [0.25, 0.25, 0.25]


def test_pages_are_followed() -> None:
    pages = {None: {"items": [{"id": 1}, {"id": 2}], "next_cursor": "c1"},
             "c1": {"items": [{"id": 3}], "next_cursor": None}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    with make(handler) as client:
        assert [a["id"] for a in client.iter_audits(page_size=2)] == [1, 2, 3]


def test_report_pdf_and_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".pdf"):
            return httpx.Response(200, content=b"%PDF-1.4 ...", headers={"content-type": "application/pdf"})
        return httpx.Response(200, content=json.dumps({"items": [{"id": "m"}]}).encode())

    with make(handler) as client:
        assert client.report_pdf("a").startswith(b"%PDF")
        assert client.models() == [{"id": "m"}]
