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
    from app.storage import migrate

    data = tmp_path_factory.mktemp("web")
    settings = Settings(data_dir=str(data))
    migrate.upgrade(settings.database_url)
    with TestClient(create_app(settings, queue=_Queue())) as c:
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
    # Its own policy: scripts from here or carrying this response's nonce, images only from here
    # (ReDoc's sidebar logo from its CDN is refused), never framed.
    csp = r.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce is not None and "img-src 'self' data:;" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-eval" not in csp and "script-src 'self' 'nonce-" in csp
    inline = re.findall(r"<script([^>]*)>(.*?)</script>", r.text, flags=re.S)
    assert all(f'nonce="{nonce.group(1)}"' in attrs for attrs, body in inline if body.strip()), inline
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert client.get(path).headers["content-security-policy"] != csp  # a fresh nonce each time


def test_the_submit_form_is_described_from_its_typed_model(client: Any) -> None:
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/audits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    # The typed form, with the registry's model ids as the models' enumeration.
    for name in ("model", "reference_model"):
        assert schema["properties"][name].pop("enum")
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


def test_the_openapi_document_accepts_only_what_the_api_accepts(client: Any) -> None:
    doc = client.get("/openapi.json").json()
    form = doc["paths"]["/v1/audits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    # The model ids are the registry's (the shipped models here), not any string.
    assert "digits-memorised" in form["properties"]["model"]["enum"]
    assert form["properties"]["reference_model"]["enum"] == form["properties"]["model"]["enum"]
    # A plan takes exactly one pilot.
    assert doc["components"]["schemas"]["PlanRequest"]["oneOf"] == [{"required": ["audit_id"]},
                                                                    {"required": ["report"]}]
    # A cursor is this API's opaque token: the characters it is written in.
    cursor = next(p for p in doc["paths"]["/v1/audits"]["get"]["parameters"] if p["name"] == "cursor")
    pattern = cursor["schema"]["pattern"]
    assert re.fullmatch(pattern, "MjAyNi0xMi0wN1QxMzoyNToz") and not re.fullmatch(pattern, "a b/c=")
    # Over HTTP, a model is a directory on the host; hub ids go through the command line.
    assert "hub_model_via_cli" in doc["components"]["schemas"]["RegisterModel"]["properties"]["source"]["description"]


def test_the_page_writes_p_values_as_the_library_does() -> None:
    """One p-value format: the page's formatP (app.js) is the library's format_p_value."""
    import json
    import shutil
    import subprocess

    from app.api.routes.web import WEB_DIR
    from cdi.pvalue import format_p_value

    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to run the page's formatter (apt-get install nodejs)")
    source = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    fn = re.search(r"  function formatP\(p\) \{.*?\n  \}\n", source, flags=re.S)
    assert fn is not None
    values = [0.5, 0.0123, 0.001, 0.000999, 1e-06, 9.99999000001e-07, 0.000001, 1.23456e-12, 0.049999,
              0.1, 1.0, 0.0001, 0.00012345, 2e-300]
    script = fn.group(0) + f"console.log(JSON.stringify({json.dumps(values)}.map(formatP)));"
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(out) == [format_p_value(v) for v in values]
    assert format_p_value(9.99999000001e-07) == format_p_value(0.000001) == "1e-06"


def test_the_pages_preview_refuses_what_the_service_refuses(tmp_path: Path) -> None:
    """The preview (zip.js, run by node) and the service (app.uploads) judge the same zip members
    alike, from one set of rules (GET /v1/upload-rules): a text file named fake.png, an SVG
    named .png, a '..' path and a non-image suffix are refused by both; real images pass both."""
    import io
    import json
    import shutil
    import subprocess
    import zipfile

    from PIL import Image

    from app.api.routes.web import WEB_DIR
    from app.errors import ServiceError
    from app.settings import Settings
    from app.uploads import stage_upload, upload_rules

    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to run the page's preview code (apt-get install nodejs)")

    def png(shade: int, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        Image.new("L", (8, 8), color=shade).save(buf, format=fmt)
        return buf.getvalue()

    good = {f"ok{i}.png": png(i) for i in range(12)} | {"photo.jpg": png(200, "JPEG"), "scan.bmp": png(90, "BMP")}
    bad = {"fake.png": b"this is a text file, not a picture" * 4,
           "drawing.png": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
           "../escape.png": png(7), "notes.txt": b"where these come from"}

    def zip_of(members: dict[str, bytes], method: int) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                info = zipfile.ZipInfo(f"published/{name}" if not name.startswith("..") else name)
                info.compress_type = method
                zf.writestr(info, data)
        return buf.getvalue()

    script = (WEB_DIR / "zip.js").read_text(encoding="utf-8") + """
    const [rules, zips] = JSON.parse(require("fs").readFileSync(0, "utf8"));
    CdiZip.setRules(rules);
    (async () => {
      const out = [];
      for (const b64 of zips) {
        const file = new File([Buffer.from(b64, "base64")], "published.zip");
        const members = CdiZip.stripTop(await CdiZip.listZip(file), "published");
        const sorted = await CdiZip.sniff(CdiZip.sortFiles(members), (e) => CdiZip.memberHead(file, e));
        out.push({images: sorted.images.map((e) => e.path), refused: sorted.refused.map((r) => r.path)});
      }
      console.log(JSON.stringify(out));
    })();
    """
    import base64

    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        zips = [zip_of(good | bad, method)] + [zip_of(good | {name: data}, method) for name, data in bad.items()]
        stdin = json.dumps([upload_rules(), [base64.b64encode(z).decode() for z in zips]])
        done = subprocess.run([node, "-e", script], input=stdin, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        judged = json.loads(done.stdout)
        # The page: every good image accepted, every bad member refused.
        assert sorted(r.removeprefix("published/") for r in judged[0]["images"]) == sorted(good)
        assert sorted(r.removeprefix("published/") for r in judged[0]["refused"]) == sorted(bad)
        # The service: the good images alone pass; each bad member alone is refused.
        settings = Settings(data_dir=str(tmp_path / "data"))
        unpublished = tmp_path / "u.zip"
        unpublished.write_bytes(zip_of({f"u{i}.png": png(100 + i) for i in range(20)}, method))
        cases = [(None, judged[0], zip_of(good, method)),
                 *((n, j, z) for n, j, z in zip(bad, judged[1:], zips[1:], strict=True))]
        for name, page_view, data in cases:
            archive = tmp_path / "p.zip"
            archive.write_bytes(data)
            sets = {"published": archive, "unpublished": unpublished}
            if name is None:
                stage_upload(sets, settings, protocol="directional").cleanup()
                continue
            assert page_view["refused"], name
            with pytest.raises(ServiceError):
                stage_upload(sets, settings, protocol="directional").cleanup()


def test_the_upload_rules_state_the_librarys_sample_size_rule(client: Any) -> None:
    from cdi.errors import InputError
    from cdi.stats import check_sizes

    rules = client.get("/v1/upload-rules").json()  # no key needed
    for protocol, least in rules["minimum_images"].items():
        check_sizes(least["published"], least["unpublished"], protocol)
        fewer = ((least["published"] - 1, least["unpublished"]), (least["published"], least["unpublished"] - 1))
        for n_p, n_u in fewer:
            with pytest.raises(InputError):
                check_sizes(n_p, n_u, protocol)
    assert ".png" in rules["image_suffixes"] and {"format": "PNG", "bytes": [
        {"offset": 0, "hex": "89504e470d0a1a0a"}]} in rules["image_signatures"]
