"""The web page in a real browser: Debian's headless Chromium driven by Playwright.

A real API (uvicorn) and a real Celery worker on Postgres and Redis; the shipped model
``digits-memorised`` and its own member and held-out digits. The happy path goes sign in →
choose the two folders → preview → submit → progress → verdict with its figures → download
the JSON and the PDF → list → delete; the error paths are a bad key, too few images, a
corrupt image and a zip holding a file the service refuses.

Screenshots of every page go to ``test-artifacts/web/`` (or ``$CDI_TEST_ARTIFACTS/web``).
No browser is downloaded: ``scripts/services`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Proc, free_port, make_tenant, service_env, spawn, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = os.environ.get("CDI_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("CDI_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web"
N_PUBLISHED, N_UNPUBLISHED = 20, 20
AUDIT_TIMEOUT_MS = 420_000


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's folders, a too-small pair, a folder with a corrupt image, a zip with a text file."""
    from cdi import zoo

    root = tmp_path_factory.mktemp("web-images")
    zoo.get("digits-memorised").export(root / "demo", members=N_PUBLISHED, held_out=N_UNPUBLISHED)
    demo_p, demo_u = root / "demo" / "published", root / "demo" / "unpublished"
    few_p, few_u = root / "few" / "published", root / "few" / "unpublished"
    for src, dst in ((demo_p, few_p), (demo_u, few_u)):
        dst.mkdir(parents=True)
        for p in sorted(src.glob("*.png"))[:3]:
            shutil.copy(p, dst / p.name)
    corrupt = root / "corrupt" / "published"
    shutil.copytree(demo_p, corrupt)
    first = sorted(corrupt.glob("*.png"))[0]
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not the rest of a PNG file" * 4)
    notes_zip = root / "with-notes.zip"
    with zipfile.ZipFile(notes_zip, "w") as zf:
        for p in sorted(demo_u.glob("*.png")):
            zf.write(p, f"unpublished/{p.name}")
        zf.writestr("unpublished/notes.txt", "where these come from")
    published_zip = root / "published.zip"
    with zipfile.ZipFile(published_zip, "w") as zf:
        for p in sorted(demo_p.glob("*.png")):
            zf.write(p, f"my-photos/{p.name}")
    return {"demo_p": demo_p, "demo_u": demo_u, "few_p": few_p, "few_u": few_u, "corrupt_p": corrupt,
            "notes_zip": notes_zip, "published_zip": published_zip}


@pytest.fixture(scope="module")
def site(migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real API and a real worker on this session's Postgres and Redis, and a tenant's key."""
    tmp = tmp_path_factory.mktemp("web-service")
    env = service_env(migrated, redis_url, tmp / "blobs")
    procs: list[Proc] = []
    try:
        worker = spawn([sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker",
                        "--loglevel=INFO", f"--hostname=web-{uuid.uuid4().hex[:6]}@%h",
                        f"--queues={env['CDI_AUDIT_QUEUE']},{env['CDI_CALLBACK_QUEUE']}",
                        "--concurrency=1", "--pool=solo", "--without-gossip", "--without-mingle"],
                       env, tmp / "worker.log")
        procs.append(worker)
        port = free_port()
        api = spawn([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                     "--port", str(port), "--log-level", "warning"], env, tmp / "api.log")
        procs.append(api)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", api)
        yield {"base": base, "key": make_tenant(migrated, "web").key, "worker": worker, "api": api}
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/services installs Debian's chromium "
                    "(apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, site: dict[str, Any]) -> Iterator[Any]:
    # The page's Content-Security-Policy forbids eval, which Playwright's waiting helpers use.
    context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True, bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, site: dict[str, Any]) -> None:
    page.goto(site["base"] + "/")
    page.get_by_label("API key").fill(site["key"])
    page.locator("#signin-form button[type=submit]").click()
    page.wait_for_selector("#view-new:not([hidden])")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def test_upload_progress_verdict_download_delete(page: Any, site: dict[str, Any], images: dict[str, Path]) -> None:
    page.goto(site["base"] + "/")
    assert page.locator("#nav").is_hidden()
    shot(page, "1-sign-in")
    sign_in(page, site)
    assert page.locator("#model").input_value() == "digits-memorised"
    # The options come from the API's description of the form: its defaults.
    assert page.locator("#alpha").input_value() == "0.01"
    assert page.locator("#protocol").input_value() == "directional"

    page.set_input_files("#published-folder", str(images["demo_p"]))
    page.set_input_files("#unpublished-folder", str(images["demo_u"]))
    page.wait_for_selector("#unpublished-preview .count")
    assert page.locator("#published-preview .count").inner_text() == f"{N_PUBLISHED} images"
    assert page.locator("#unpublished-preview .count").inner_text() == f"{N_UNPUBLISHED} images"
    assert "kB" in page.locator("#published-preview").inner_text()
    page.locator("details.options summary").click()
    shot(page, "2-upload")

    page.get_by_role("button", name="Start the audit").click()
    page.wait_for_selector("#view-audit:not([hidden])")
    page.wait_for_selector("#stages li")
    assert page.locator("#stages li").count() == 6
    # The progress page while the worker counts images or steps (or, on a fast machine, done).
    page.wait_for_function("document.querySelector('#stage-text').textContent.includes(' of ')"
                           " || !document.querySelector('#verdict').hidden", timeout=AUDIT_TIMEOUT_MS)
    shot(page, "3-progress")
    audit_id = page.evaluate("location.hash").removeprefix("#audit/")
    uuid.UUID(audit_id)

    page.wait_for_selector("#verdict:not([hidden])", timeout=AUDIT_TIMEOUT_MS)
    page.wait_for_function(
        "[...document.querySelectorAll('#figures img, #fig-p-value')].length === 5 && "
        "[...document.querySelectorAll('#figures img, #fig-p-value')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=180_000)
    shot(page, "4-verdict")
    label = page.locator("#verdict-label").inner_text()
    controls = page.locator("#verdict-controls tr")
    assert "p-value:" in page.locator("#verdict-p").inner_text()

    with page.expect_download() as info:
        page.get_by_role("button", name="Download the report (JSON)").click()
    report = json.loads(Path(info.value.path()).read_text())
    assert info.value.suggested_filename == f"cdi-audit-{audit_id}.json"
    # One row per control of the report: negative control, direction and distribution checks,
    # duplicates, the calibrated test and the shift control.
    from cdi.report import parse_report
    from cdi.report.explain import control_rows

    rows = control_rows(parse_report(report))
    assert controls.count() == len(rows) >= 6
    assert any("shift" in r[0].lower() for r in rows) and any("calibrated" in r[0].lower() for r in rows)
    # The page shows the report's verdict: the memorising model was trained on its members.
    assert report["verdict"] == "used"
    assert label == "Verdict: USED"
    assert f"{report['p_value']:.3g}" in page.locator("#verdict-p").inner_text()
    with page.expect_download() as info:
        page.get_by_role("button", name="Download the report (PDF)").click()
    pdf = Path(info.value.path()).read_bytes()
    assert pdf.startswith(b"%PDF-") and info.value.suggested_filename.endswith(".pdf")

    page.get_by_role("link", name="Your audits").click()
    page.wait_for_selector("#audits-body tr")
    row = page.locator("#audits-body tr", has=page.locator(f"a[href='#audit/{audit_id}']"))
    assert "used" in row.inner_text() and "done" in row.inner_text()
    shot(page, "5-audits")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button").click()
    page.wait_for_function(f"[...document.querySelectorAll('#audits-body tr')].some(r => "
                           f"r.innerHTML.includes('{audit_id}') && r.innerText.includes('(deleted)'))")
    shot(page, "6-deleted")


def test_keyboard_alone_signs_in_and_reaches_every_control(page: Any, site: dict[str, Any]) -> None:
    page.goto(site["base"] + "/")
    # The key's field has the focus on arrival; the skip link is the first stop before it.
    page.wait_for_function("document.activeElement.id === 'api-key'")
    assert page.evaluate("document.querySelector('a, button, input').className") == "skip"
    page.keyboard.type(site["key"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-new:not([hidden])")
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id"))
        if reached[-1] == "published-folder":
            # The visually hidden file input shows its focus on its label, the visible button.
            style = page.evaluate("getComputedStyle(document.querySelector(\"label[for='published-folder']\"))"
                                  ".outlineStyle")
            assert style != "none"
    for control in ("published-folder", "published-zip", "unpublished-folder", "unpublished-zip", "model", "submit"):
        assert control in reached, reached


def test_bad_key_is_refused_with_a_message(page: Any, site: dict[str, Any]) -> None:
    page.goto(site["base"] + "/")
    page.get_by_label("API key").fill("cdi_0000000000000000_not-a-real-key")
    page.locator("#signin-form button[type=submit]").click()
    error = page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "not valid" in error.inner_text() and "cdi admin create-key" in error.inner_text()
    assert page.locator("#view-new").is_hidden()
    shot(page, "error-bad-key")


def test_too_few_images_and_a_corrupt_image_are_explained(page: Any, site: dict[str, Any],
                                                          images: dict[str, Path]) -> None:
    sign_in(page, site)
    page.set_input_files("#published-folder", str(images["few_p"]))
    page.set_input_files("#unpublished-folder", str(images["few_u"]))
    page.wait_for_selector("#unpublished-preview .count")
    page.get_by_role("button", name="Start the audit").click()
    error = page.locator("#submit-error")
    error.wait_for(state="visible")
    # Caught before anything is sent, by the service's own rule (GET /v1/upload-rules).
    text = error.inner_text()
    assert "needs at least 10 published images" in text and "would refuse" in text, text
    assert "needs at least" in page.locator("#published-preview").inner_text()
    shot(page, "error-too-few")

    page.set_input_files("#published-folder", str(images["corrupt_p"]))
    page.set_input_files("#unpublished-folder", str(images["demo_u"]))
    page.wait_for_function("document.querySelector('#published-preview .count').textContent === '20 images'")
    page.get_by_role("button", name="Start the audit").click()
    page.wait_for_function("document.querySelector('#submit-error').innerText.includes('image')"
                           " && !document.querySelector('#submit-error').innerText.includes('needs at least')")
    text = error.inner_text()
    assert sorted(images["corrupt_p"].glob("*.png"))[0].name in text, text
    assert "image_corrupt" in text or "not_an_image" in text, text
    assert page.locator("#view-new").is_visible()
    shot(page, "error-corrupt-image")


def test_a_zip_with_a_refused_file_is_caught_before_upload(page: Any, site: dict[str, Any],
                                                           images: dict[str, Path]) -> None:
    sign_in(page, site)
    # The published zip is dropped on its box, as a person would drag it there.
    data = list(images["published_zip"].read_bytes())
    page.evaluate("""([bytes, name]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, {type: "application/zip"}));
        const zone = document.querySelector('[data-drop="published"]');
        for (const type of ["dragover", "drop"]) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }
    }""", [data, images["published_zip"].name])
    page.wait_for_selector("#published-preview .count")
    assert "from published.zip" in page.locator("#published-preview").inner_text()
    page.set_input_files("#unpublished-zip", str(images["notes_zip"]))
    page.wait_for_selector("#unpublished-preview .refused")
    assert page.locator("#published-preview .count").inner_text() == f"{N_PUBLISHED} images"
    preview = page.locator("#unpublished-preview").inner_text()
    assert "will refuse this zip" in preview and "notes.txt: not an image" in preview
    page.get_by_role("button", name="Start the audit").click()
    error = page.locator("#submit-error")
    error.wait_for(state="visible")
    assert "refuses" in error.inner_text()
    shot(page, "error-refused-zip")


@pytest.mark.parametrize("path,ready", [("/docs", ".swagger-ui .info .title"), ("/redoc", ".api-content h1")])
def test_api_docs_render_under_their_policy_and_load_nothing_from_elsewhere(
        browser: Any, site: dict[str, Any], path: str, ready: str) -> None:
    import httpx

    r = httpx.get(site["base"] + path, timeout=10)
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and "unsafe-eval" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    context = browser.new_context()  # the page's own policy applies
    page = context.new_page()
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(site["base"] + path)
        page.wait_for_selector(ready, timeout=60_000)
        assert "CDI audit service" in page.inner_text(ready)
    finally:
        context.close()
    assert not errors, errors
    elsewhere = [u for u in requested if not u.startswith((site["base"], "data:", "blob:"))]
    assert not elsewhere, elsewhere
