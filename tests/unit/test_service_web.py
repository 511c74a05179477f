"""The web page's files, the offline API docs, the submit form's typed description, the explanation text."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import synthetic_result

from app import errors as E
from app.errors import BadInput
from app.forms import form_schema
from app.uploads import parse_options


class _Queue:
    def enqueue(self, audit_id: uuid.UUID) -> None:
        raise AssertionError("nothing is queued here")

    def enqueue_callback(self, audit_id: uuid.UUID) -> None:
        raise AssertionError("nothing is queued here")

    def ping(self) -> None:
        pass


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    data = tmp_path_factory.mktemp("web")
    with TestClient(create_app(Settings(data_dir=str(data)), queue=_Queue())) as c:
        yield c


def _urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


def test_the_page_loads_nothing_from_elsewhere(client: Any) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    for url in _urls(r.text):
        assert url.startswith(("/", "#", "data:")), url
        if url.startswith("/web/"):
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 500, url
    # Every form control has a label (accessibility): each input/select id is some label's "for".
    ids = set(re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', r.text))
    labelled = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', r.text))
    assert ids and ids <= labelled, ids - labelled


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_are_served_without_a_cdn(client: Any, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    urls = [u for u in _urls(r.text) if not u.startswith("#")]
    assert urls and all(u.startswith("/") for u in urls), urls
    assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert client.get("/openapi.json").status_code == 200


def test_the_submit_form_is_described_from_its_typed_model(client: Any) -> None:
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/audits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema == form_schema()
    props = schema["properties"]
    assert props["alpha"]["default"] == 0.01
    assert (props["alpha"]["exclusiveMinimum"], props["alpha"]["exclusiveMaximum"]) == (0, 0.5)
    assert props["protocol"]["enum"] == ["directional", "crossfit", "reference"]
    assert props["protocol"]["default"] == "directional"
    assert props["features"]["enum"] == ["verdict", "all", "gradient-free"]
    assert props["features"]["default"] == "verdict" and props["precision"]["default"] == "fp32"
    for name in ("archive", "published", "unpublished", "captions", "labels"):
        assert props[name] == {**props[name], "type": "string", "format": "binary"}
    assert schema["required"] == ["model"]
    assert all("anyOf" not in p for p in props.values())
    # The parser reads the same model: its defaults are the schema's.
    options, callback = parse_options({})
    assert options.to_dict() == {**{k: props[k]["default"] for k in ("alpha", "protocol", "features", "seed",
                                                                      "sequential", "looks", "spending", "futility",
                                                                      "precision")}, "batch_size": None}
    assert props["sequential"]["type"] == "boolean" and props["sequential"]["default"] is False
    assert (props["looks"]["minimum"], props["looks"]["maximum"]) == (1, 10)
    assert callback is None


@pytest.mark.parametrize(("fields", "words"), [
    ({"alpha": "0.5"}, ["alpha", "0 < alpha < 0.5", "0.5"]),
    ({"protocol": "magic"}, ["protocol", "crossfit, reference", "magic"]),
    ({"seed": "-1"}, ["seed", "-1"]),
    ({"callback_url": "ftp://x"}, ["callback_url", "http or https"]),
    ({"batch_size": "0"}, ["batch_size", "1 to 1024, or auto", "'0'"]),
    ({"batch_size": "1025"}, ["batch_size", "1 to 1024, or auto"]),
    ({"features": "some"}, ["features", "verdict, all, gradient-free"]),
    ({"precision": "fp8"}, ["precision", "fp32, auto, bf16, fp16"]),
])
def test_option_errors_name_what_is_allowed(fields: dict[str, str], words: list[str]) -> None:
    with pytest.raises(BadInput) as info:
        parse_options(fields)
    assert info.value.code == E.INVALID_OPTIONS
    for w in words:
        assert w in info.value.message, info.value.message


@pytest.mark.parametrize(("kind", "verdict"), [("used", "used"), ("null", "not_detected"),
                                               ("shift", "inconclusive")])
def test_the_explanation_is_the_pdfs_in_safe_markup(kind: str, verdict: str) -> None:
    from cdi.report import build_report, seal
    from cdi.report.explain import MONO_HTML, MONO_PDF, explain

    report = seal(build_report(synthetic_result(kind, seed={"used": 0, "null": 3, "shift": 1}[kind])))
    web, pdf = explain(report, MONO_HTML), explain(report, MONO_PDF)
    assert web.verdict == verdict and web.headline == pdf.headline and web.means == pdf.means
    assert [c.name for c in web.controls] == ["Negative control", "Direction check", "Distribution check",
                                              "Duplicates"]
    assert any(c.failed for c in web.controls) == (verdict == "inconclusive")
    texts = [web.headline, web.p_value, *web.tested, web.means, web.not_means, web.check,
             *(c.text for c in web.controls), *web.warnings]
    tags = {t for text in texts for t in re.findall(r"</?([a-zA-Z]+)", text)}
    assert tags <= {"b", "i", "code"}, tags
    assert report.digest in web.check and "<code>cdi verify report.json</code>" in web.check
    assert "CDIMono" in pdf.check


def test_the_page_and_its_scripts_ship_with_the_package() -> None:
    from app.api.routes.web import WEB_DIR

    names = {p.name for p in Path(WEB_DIR).iterdir()}
    assert {"index.html", "app.js", "app.css", "zip.js"} <= names


def test_an_unknown_form_field_lists_the_known_ones(tmp_path: Path) -> None:
    import asyncio

    from app.api.multipart import read_form
    from app.services import FILE_FIELDS, TEXT_FIELDS

    body = (b"--b\r\nContent-Disposition: form-data; name=\"modle\"\r\n\r\ndigits-memorised\r\n--b--\r\n")

    async def chunks() -> Any:
        yield body

    with pytest.raises(BadInput) as info:
        asyncio.run(read_form("multipart/form-data; boundary=b", chunks(), tmp_dir=tmp_path, file_fields=FILE_FIELDS,
                              text_fields=TEXT_FIELDS, max_body_bytes=10_000))
    assert "'modle'" in info.value.message
    assert all(name in info.value.message for name in FILE_FIELDS | TEXT_FIELDS)
