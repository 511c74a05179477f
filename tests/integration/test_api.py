"""The HTTP API against the real Postgres and Redis (in-process app, no worker).

Covers auth, tenant isolation, every "bad input" case of the issue over HTTP (4xx, stable
code, nothing stored, nothing queued), listing, cancellation, models and probes.
"""

from __future__ import annotations

import io
import stat
import zipfile
from typing import Any

import pytest
from sqlalchemy import func, select

from app.storage.db import session_scope
from app.storage.models import Audit, AuditImage
from cdi.report import result_to_dict

from .conftest import Service, png, synthetic_archive, zip_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_id(service: Service, migrated: str) -> str:
    """A registered model to submit against (no worker runs here, so its weights are not read)."""
    from app.storage.repositories import ModelRepository

    with session_scope(migrated) as s:
        ModelRepository(s).upsert("api-test-model", source="/nonexistent/api-test-model", revision=None,
                                  family="pixel", conditioning="none", description="API tests only")
    r = service.client.get("/v1/models", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    assert "api-test-model" in [m["id"] for m in r.json()["items"]]
    return "api-test-model"


@pytest.fixture(scope="module")
def zoo_model() -> Any:
    from app.registry import zoo_models

    models = zoo_models()
    assert models, "the shipped zoo models should be listed by default (cdi.zoo.list_models)"
    return models[0]


def submit(service: Service, tenant: Any, files: dict[str, Any], **fields: Any) -> Any:
    return service.client.post(  # type: ignore[attr-defined]
        "/v1/audits", headers=service.headers(tenant), files=files, data={k: str(v) for k, v in fields.items()})


def counts(service: Service) -> tuple[int, int, int]:
    with session_scope(service.settings.database_url) as s:  # type: ignore[attr-defined]
        audits = s.scalar(select(func.count()).select_from(Audit))
        images = s.scalar(select(func.count()).select_from(AuditImage))
    root = service.settings.blobs  # type: ignore[attr-defined]
    blobs = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]
    return int(audits or 0), int(images or 0), len(blobs)


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer cdi_0123456789abcdef_" + "A" * 43}, "invalid_api_key"),
    ({"Authorization": "Bearer not-a-key"}, "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwdw=="}, "missing_api_key"),
])
def test_every_v1_call_needs_a_valid_key(service: Service, headers: dict[str, str], code: str) -> None:
    c = service.client
    for method, url in [("GET", "/v1/audits"), ("GET", "/v1/models"), ("POST", "/v1/audits"),
                        ("GET", "/v1/audits/00000000-0000-0000-0000-000000000000"),
                        ("DELETE", "/v1/audits/00000000-0000-0000-0000-000000000000")]:
        r = c.request(method, url, headers=headers)  # type: ignore[attr-defined]
        assert r.status_code == 401, (method, url, r.text)
        assert r.json()["error"]["code"] == code
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_is_refused(service: Service, migrated: str) -> None:
    from app import security
    from app.storage.repositories import ApiKeyRepository, TenantRepository

    with session_scope(migrated) as s:
        tenant = TenantRepository(s).create("revoked-tenant")
        key = ApiKeyRepository(s).create(tenant).plaintext
    assert service.client.get("/v1/audits", headers={"Authorization": f"Bearer {key}"}).status_code == 200  # type: ignore[attr-defined]
    parsed = security.parse_key(key)
    assert parsed is not None
    with session_scope(migrated) as s:
        assert ApiKeyRepository(s).revoke(parsed[0])
    r = service.client.get("/v1/audits", headers={"Authorization": f"Bearer {key}"})  # type: ignore[attr-defined]
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_keys_are_stored_hashed(service: Service, migrated: str) -> None:
    from app.storage.models import ApiKey

    with session_scope(migrated) as s:
        stored = [(k.key_id, k.secret_sha256) for k in s.scalars(select(ApiKey))]
    secret = service.alice.key.split("_", 2)[2]
    assert all(secret not in h for _, h in stored)
    assert any(service.alice.key.split("_")[1] == kid for kid, _ in stored)


# --- submission and tenant isolation --------------------------------------------------------


def test_submit_poll_list_and_isolation(service: Service, model_id: str) -> None:
    service.purge()
    before = counts(service)
    import random

    archive = synthetic_archive(offset=random.randrange(10**6, 10**9))  # images no other test uploads
    r = submit(service, service.alice, {"archive": ("a.zip", archive, "application/zip")},
               model=model_id, alpha=0.05, seed=3, sequential="true", looks=3)
    assert r.status_code == 202, r.text
    body = r.json()
    audit_id = body["id"]
    assert body["state"] == "queued"
    assert body["urls"] == {"self": f"/v1/audits/{audit_id}", "report": f"/v1/audits/{audit_id}/report",
                            "report_pdf": f"/v1/audits/{audit_id}/report.pdf"}
    assert r.headers["location"] == f"/v1/audits/{audit_id}"
    assert service.queued() == 1
    a, i, b = counts(service)
    assert (a - before[0], i - before[1]) == (1, 30) and b - before[2] == 30

    status = service.client.get(f"/v1/audits/{audit_id}", headers=service.headers(service.alice)).json()  # type: ignore[attr-defined]
    assert status["state"] == "queued" and status["model"] == model_id
    assert status["options"] == {"alpha": 0.05, "protocol": "directional", "features": "verdict", "seed": 3,
                                 "sequential": True, "looks": 3, "spending": "obrien-fleming", "futility": False,
                                 "precision": "fp32", "batch_size": None}
    assert status["progress"] == {"stage": None, "done": 0, "total": 0}
    assert status["n_published"] == 10 and status["n_unpublished"] == 20
    assert status["error"] is None and status["created_at"] and status["updated_at"]

    # Bob sees none of it: 404 everywhere, not 403.
    for method, url in [("GET", f"/v1/audits/{audit_id}"), ("GET", f"/v1/audits/{audit_id}/report"),
                        ("GET", f"/v1/audits/{audit_id}/report.pdf"), ("DELETE", f"/v1/audits/{audit_id}")]:
        r = service.client.request(method, url, headers=service.headers(service.bob))  # type: ignore[attr-defined]
        assert r.status_code == 404 and r.json()["error"]["code"] == "audit_not_found", (method, url)
    assert audit_id not in [x["id"] for x in service.client.get(  # type: ignore[attr-defined]
        "/v1/audits", headers=service.headers(service.bob)).json()["items"]]

    # The report is not ready while queued.
    r = service.client.get(f"/v1/audits/{audit_id}/report", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 409 and r.json()["error"]["code"] == "report_not_ready"

    # DELETE cancels and removes the images; the same images uploaded by another audit stay.
    r2 = submit(service, service.bob, {"archive": ("a.zip", archive, "application/zip")}, model=model_id)
    assert r2.status_code == 202
    r = service.client.delete(f"/v1/audits/{audit_id}", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["images_deleted"]
    assert counts(service)[2] == before[2] + 30  # shared blobs kept for bob's audit
    r = service.client.delete(f"/v1/audits/{r2.json()['id']}", headers=service.headers(service.bob))  # type: ignore[attr-defined]
    assert r.status_code == 200
    assert counts(service)[2] == before[2]  # now nobody references them
    service.purge()


def test_two_archives_captions_and_pagination(service: Service, model_id: str) -> None:
    service.purge()
    pub = zip_bytes({f"p{i}.png": png(i) for i in range(10)})
    unpub = zip_bytes({f"u{i}.png": png(300 + i) for i in range(20)})
    ids = []
    for seed in range(3):
        r = submit(service, service.admin, {"published": ("p.zip", pub), "unpublished": ("u.zip", unpub),
                                            "captions": ("c.csv", b"file,caption\np1.png,a one\n")},
                   model=model_id, seed=seed)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    seen = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = service.client.get("/v1/audits", headers=service.headers(service.admin), params=params).json()  # type: ignore[attr-defined]
        seen += [x["id"] for x in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen[:3] == ids[::-1]  # newest first, no duplicates, nothing missed
    assert len(seen) == len(set(seen))
    r = service.client.get("/v1/audits", headers=service.headers(service.admin), params={"cursor": "garbage"})  # type: ignore[attr-defined]
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cursor"
    for audit_id in ids:
        service.client.delete(f"/v1/audits/{audit_id}", headers=service.headers(service.admin))  # type: ignore[attr-defined]
    service.purge()


# --- bad input: 4xx, stable code, nothing stored, nothing queued ---------------------------


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(10):
            zf.writestr(f"published/{i}.png", png(i))
        for i in range(20):
            zf.writestr(f"unpublished/{i}.png", png(100 + i))
        info = zipfile.ZipInfo("published/link.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _with(extra: dict[str, bytes]) -> bytes:
    members = {f"published/p{i}.png": png(i) for i in range(10)}
    members.update({f"unpublished/u{i}.png": png(100 + i) for i in range(20)})
    members.update(extra)
    return zip_bytes(members)


GOOD = synthetic_archive()

BAD_CASES: list[tuple[str, dict[str, Any], dict[str, Any], int, str]] = [
    ("not a zip", {"archive": ("a.zip", b"hello, world")}, {}, 422, "not_a_zip"),
    ("corrupt zip", {"archive": ("a.zip", GOOD[: len(GOOD) // 2])}, {}, 422, "corrupt_zip"),
    ("zip bomb", {"archive": ("a.zip", _with({"published/bomb.png": b"\0" * (20 * 1024**2)}))}, {}, 422, "zip_bomb"),
    ("dot-dot", {"archive": ("a.zip", _with({"published/../../x.png": png(1)}))}, {}, 422, "unsafe_path"),
    ("absolute", {"archive": ("a.zip", _with({"/published/x.png": png(1)}))}, {}, 422, "unsafe_path"),
    ("symlink", {"archive": ("a.zip", _symlink_zip())}, {}, 422, "symlink_in_zip"),
    ("nested", {"archive": ("a.zip", _with({"published/in.zip": zip_bytes({"x.png": png(1)})}))}, {}, 422,
     "nested_archive"),
    ("non-image", {"archive": ("a.zip", _with({"unpublished/readme.txt": b"hi"}))}, {}, 422, "not_an_image"),
    ("too few", {"archive": ("a.zip", synthetic_archive(3, 3))}, {}, 422, "too_few_images"),
    ("unknown model", {"archive": ("a.zip", GOOD)}, {"model": "no-such-model"}, 422, "unknown_model"),
    ("malformed captions", {"archive": ("a.zip", GOOD), "captions": ("c.csv", b"name,text\nx,y\n")}, {}, 422,
     "malformed_captions"),
    ("captions naming no image", {"archive": ("a.zip", GOOD), "captions": ("c.csv", b"file,caption\nzz.png,y\n")},
     {}, 422, "malformed_captions"),
    ("malformed labels", {"archive": ("a.zip", GOOD), "labels": ("l.csv", b"file,label\np000.png,x\n")}, {}, 422,
     "malformed_labels"),
    ("bad alpha", {"archive": ("a.zip", GOOD)}, {"alpha": "2"}, 422, "invalid_options"),
    ("bad protocol", {"archive": ("a.zip", GOOD)}, {"protocol": "nope"}, 422, "invalid_options"),
    ("bad features", {"archive": ("a.zip", GOOD)}, {"features": "most"}, 422, "invalid_options"),
    ("bad seed", {"archive": ("a.zip", GOOD)}, {"seed": "x"}, 422, "invalid_options"),
    ("bad looks", {"archive": ("a.zip", GOOD)}, {"sequential": "true", "looks": "11"}, 422, "invalid_options"),
    ("sequential crossfit", {"archive": ("a.zip", GOOD)}, {"sequential": "true", "protocol": "crossfit"}, 422,
     "invalid_options"),
    ("bad callback", {"archive": ("a.zip", GOOD)}, {"callback_url": "file:///etc/passwd"}, 422, "invalid_options"),
    ("no model", {"archive": ("a.zip", GOOD)}, {"model": ""}, 422, "invalid_options"),
    ("no images", {}, {}, 422, "malformed_upload"),
    ("unknown field", {"archive": ("a.zip", GOOD), "extra": ("x", b"x")}, {}, 422, "malformed_upload"),
    ("archive and published", {"archive": ("a.zip", GOOD), "published": ("p.zip", GOOD)}, {}, 422,
     "malformed_upload"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input(service: Service, model_id: str, case: tuple[str, dict[str, Any], dict[str, Any], int, str]) -> None:
    _, files, fields, status, code = case
    service.purge()
    before = counts(service)
    data = {"model": model_id} | fields
    r = submit(service, service.alice, files, **data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and len(err["message"]) > 10
    assert counts(service) == before, "something was stored"
    assert service.queued() == 0, "something was queued"
    tmp = service.settings.upload_tmp_dir  # type: ignore[attr-defined]
    assert not tmp.exists() or not any(tmp.iterdir()), "temporary files were left"


def test_limits_on_upload_size_images_and_captions(migrated: str, redis_url: str, tmp_path: Any,
                                                   model_id: str, service: Service) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    from .conftest import service_env

    env = service_env(migrated, redis_url, tmp_path / "blobs")
    base = {k.removeprefix("CDI_").lower(): v for k, v in env.items()}
    cases = [
        ({"max_upload_bytes": 4096}, {"archive": ("a.zip", GOOD)}, "upload_too_large"),
        ({"max_images": 20}, {"archive": ("a.zip", GOOD)}, "too_many_images"),
        ({"max_captions_bytes": 1024}, {"archive": ("a.zip", GOOD),
                                        "captions": ("c.csv", b"file,caption\n" + b"p000.png,x\n" * 200)},
         "captions_too_large"),
    ]
    for overrides, files, code in cases:
        app = create_app(Settings(**{**base, **overrides}))
        with TestClient(app) as client:
            r = client.post("/v1/audits", headers=service.headers(service.alice), files=files,
                            data={"model": model_id})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == code
    assert not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))


def test_malformed_multipart(service: Service) -> None:
    r = service.client.post("/v1/audits", headers={**service.headers(service.alice),  # type: ignore[attr-defined]
                                                    "Content-Type": "application/json"}, content=b"{}")
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_upload"


# --- models, probes, docs -------------------------------------------------------------------


def test_models_registration_needs_an_admin(service: Service, tmp_path: Any) -> None:
    body = {"id": "mine", "source": str(tmp_path / "missing"), "revision": None}
    r = service.client.put("/v1/models/mine", headers=service.headers(service.alice), json=body)  # type: ignore[attr-defined]
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
    r = service.client.put("/v1/models/mine", headers=service.headers(service.admin), json=body)  # type: ignore[attr-defined]
    assert r.status_code == 422 and r.json()["error"]["code"].startswith("model_")


def test_register_a_model_directory(service: Service, zoo_model: Any) -> None:
    shipped = {m["id"]: m for m in service.client.get(  # type: ignore[attr-defined]
        "/v1/models", headers=service.headers(service.alice)).json()["items"]}
    assert shipped[zoo_model.id]["origin"] == "zoo"
    from cdi import zoo

    # A shipped model is registered by its name (portable); a directory by its path.
    assert zoo_model.source == zoo_model.id
    body = {"id": "copy-of-zoo", "source": str(zoo.get(zoo_model.id).path), "description": "the same weights"}
    r = service.client.put("/v1/models/copy-of-zoo", headers=service.headers(service.admin), json=body)  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    assert r.json()["family"] == shipped[zoo_model.id]["family"] and r.json()["origin"] == "registered"
    ids = [m["id"] for m in service.client.get("/v1/models", headers=service.headers(service.bob)).json()["items"]]  # type: ignore[attr-defined]
    assert "copy-of-zoo" in ids and zoo_model.id in ids
    r = service.client.delete("/v1/models/copy-of-zoo", headers=service.headers(service.admin))  # type: ignore[attr-defined]
    assert r.status_code == 204


def test_health_and_readiness(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "ok", "checks": {}}  # type: ignore[attr-defined]
    r = service.client.get("/readyz")  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "blobs": "ok"}


def test_readiness_needs_a_live_worker(service: Service, migrated: str) -> None:
    """A deployment whose workers all died is not ready: audits would queue forever."""
    from datetime import timedelta

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.reconcile import beat, forget
    from app.storage.db import session_factory
    from app.storage.models import WorkerHeartbeat, utcnow

    settings = service.settings.model_copy(update={"ready_requires_worker": True})  # type: ignore[attr-defined]
    factory = session_factory(migrated)
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["workers"].startswith("unavailable"), r.text
        beat(factory, "readyz-test-worker")
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["workers"] == "ok (1 alive)", r.text
        with factory() as s:  # the worker stops beating (SIGKILL): stale after 3 intervals
            s.get(WorkerHeartbeat, "readyz-test-worker").seen_at = utcnow() - timedelta(  # type: ignore[union-attr]
                seconds=3 * settings.worker_heartbeat_seconds + 1)
            s.commit()
        assert client.get("/readyz").status_code == 503
        forget(factory, "readyz-test-worker")


def test_readiness_fails_when_the_broker_is_down(migrated: str, tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    from .conftest import free_port

    s = Settings(database_url=migrated, broker_url=f"redis://127.0.0.1:{free_port()}/0", blob_dir=tmp_path)
    with TestClient(create_app(s)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unavailable")


def test_openapi_documents_the_wire_format(service: Service) -> None:
    spec = service.client.get("/openapi.json").json()  # type: ignore[attr-defined]
    paths = spec["paths"]
    for path in ["/v1/audits", "/v1/audits/{audit_id}", "/v1/audits/{audit_id}/report",
                 "/v1/audits/{audit_id}/report.pdf", "/v1/models", "/healthz", "/readyz"]:
        assert path in paths, path
    form = paths["/v1/audits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"archive", "published", "unpublished", "model", "alpha", "protocol", "features", "seed", "captions",
            "labels", "callback_url"} <= set(form["properties"])
    status = spec["components"]["schemas"]["AuditStatus"]["properties"]
    assert {"id", "state", "progress", "created_at", "updated_at", "error"} <= set(status)


# --- planning -------------------------------------------------------------------------------


def test_plans_from_a_report_or_an_own_finished_audit(service: Service, migrated: str) -> None:
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_report import synthetic_result  # type: ignore[import-not-found]

    c = service.client
    document = json.loads(json.dumps(result_to_dict(synthetic_result("used", protocol="directional", seed=5))))
    r = c.post("/v1/plans", json={"report": document, "power": 0.8}, headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["power"] == 0.8 and body["n_pilot_p"] == 30 and body["n_pilot_u"] == 40
    assert body["n_per_set"] is not None and body["n_unpublished"] >= body["n_per_set"]
    assert body["summary"].startswith("About")

    # A finished audit of the caller's: its stored report is the pilot; another tenant gets 404.
    with session_scope(migrated) as s:
        audit = Audit(tenant_id=service.alice.id, model_id="synthetic", model_source="synthetic", state="done",
                      options={}, report=document, n_published=30, n_unpublished=40)
        s.add(audit)
        s.flush()
        audit_id = str(audit.id)
    r = c.post("/v1/plans", json={"audit_id": audit_id}, headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.json()["power"] == 0.9, r.text
    r = c.post("/v1/plans", json={"audit_id": audit_id}, headers=service.headers(service.bob))  # type: ignore[attr-defined]
    assert r.status_code == 404 and r.json()["error"]["code"] == "audit_not_found"

    for bad in ({}, {"audit_id": audit_id, "report": document}, {"report": {"verdict": "used"}},
                {"report": document, "alpha": 0.7}):
        r = c.post("/v1/plans", json=bad, headers=service.headers(service.alice))  # type: ignore[attr-defined]
        assert r.status_code == 422, (bad.keys(), r.text)
        assert r.json()["error"]["code"] in ("invalid_request", "invalid_report", "validation_error"), r.text
