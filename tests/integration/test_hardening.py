"""Hardening over HTTP, against the real Postgres and Redis (in-process API, no worker).

Input that used to answer 5xx (NUL bytes, labels, cursors, states), a database outage (503),
quotas and rate limits (429 with Retry-After), per-image limits, what DELETE removes, the
reconciler and the send-after-commit outbox, and spool files of dead uploads.
"""

from __future__ import annotations

import base64
import random
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.storage.db import session_scope
from app.storage.models import Audit, AuditImage, AuditRun, FeatureRow

from .conftest import Service, png, synthetic_archive, zip_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_id(service: Service, migrated: str) -> str:
    from app.storage.repositories import ModelRepository

    with session_scope(migrated) as s:
        ModelRepository(s).upsert("hardening-model", source="/nonexistent/hardening-model", revision=None,
                                  family="pixel", conditioning="none", description="hardening tests only")
    return "hardening-model"


def _submit(service: Service, tenant: Any, archive: bytes | None = None, files: dict[str, Any] | None = None,
            client: Any = None, **fields: Any) -> Any:
    files = files if files is not None else {"archive": ("a.zip", archive or _fresh_archive(), "application/zip")}
    return (client or service.client).post(
        "/v1/audits", headers=service.headers(tenant), files=files, data={k: str(v) for k, v in fields.items()})


def _fresh_archive(n_p: int = 10, n_u: int = 20) -> bytes:
    return synthetic_archive(n_p, n_u, offset=random.randrange(10**6, 10**9))


#: A fixed id: test ids must be the same in every test process (pytest-xdist compares them).
_SOME_ID = uuid.UUID("9e2f1638-1176-4b92-a636-69e497043e4d")


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("url,code", [
    ("/v1/audits?state=%00", "invalid_characters"),
    ("/v1/audits?state=bogus", "invalid_state"),
    ("/v1/audits?cursor=" + _cursor(f"0001-01-01T00:00:00+14:00|{_SOME_ID}"), "invalid_cursor"),
    ("/v1/audits?cursor=" + _cursor(f"0001-01-01T00:00:00|{_SOME_ID}"), "invalid_cursor"),
    ("/v1/audits?cursor=" + _cursor(f"9999-12-31T23:59:59-14:00|{_SOME_ID}"), "invalid_cursor"),
    ("/v1/audits?cursor=" + _cursor("2026-01-01T00:00:00+00:00|not-a-uuid"), "invalid_cursor"),
    ("/v1/audits?cursor=%FF%FE", "invalid_cursor"),
    ("/v1/audits/%00", "invalid_characters"),
])
def test_hostile_queries_answer_4xx(service: Service, url: str, code: str) -> None:
    r = service.client.get(url, headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("fields,files,code", [
    ({"model": "hardening-model\x00"}, None, "invalid_characters"),
    ({"callback_url": "https://example.com/\x00"}, None, "invalid_characters"),
    ({"callback_url": "http://169.254.169.254/latest/meta-data/"}, None, "invalid_callback_url"),
    ({"callback_url": "http://[::ffff:169.254.169.254]/"}, None, "invalid_callback_url"),
    ({"callback_url": "http://0x7f000002/"}, None, "invalid_callback_url"),  # 127.0.0.1 is allowed here
    ({"callback_url": "http://localhost:5432/"}, None, "invalid_callback_url"),
    ({"callback_url": "http://10.0.0.1/"}, None, "invalid_callback_url"),
    ({"retain_images": "perhaps"}, None, "invalid_options"),
    ({}, {"labels": ("l.csv", "file,label\np000.png,²\n".encode())}, "malformed_labels"),
    ({}, {"labels": ("l.csv", b"file,label\np000.png,--1\n")}, "malformed_labels"),
])
def test_hostile_form_fields_answer_4xx(service: Service, model_id: str, fields: dict[str, str],
                                        files: dict[str, Any] | None, code: str) -> None:
    all_files = {"archive": ("a.zip", _fresh_archive(), "application/zip"), **(files or {})}
    r = _submit(service, service.alice, files=all_files, **({"model": model_id} | fields))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


def test_model_ids_with_nul_are_refused(service: Service) -> None:
    c = service.client
    r = c.put("/v1/models/x", headers=service.headers(service.admin),  # type: ignore[attr-defined]
              json={"id": "x", "source": "a\x00b"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = c.put("/v1/models/x%00", headers=service.headers(service.admin), json={"id": "x\x00", "source": "a"})  # type: ignore[attr-defined]
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_characters"


def test_options_answers_405_with_allow(service: Service) -> None:
    r = service.client.options("/v1/audits", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_database_outage_answers_503(migrated: str, redis_url: str, tmp_path: Any, service: Service) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    from .conftest import free_port, service_env

    env = service_env(migrated, redis_url, tmp_path / "blobs")
    base = {k.removeprefix("CDI_").lower(): v for k, v in env.items()}
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    with TestClient(create_app(Settings(**{**base, "database_url": down})), raise_server_exceptions=False) as client:
        for method, url in [("GET", "/v1/audits"), ("GET", f"/v1/audits/{uuid.uuid4()}"), ("GET", "/v1/models")]:
            r = client.request(method, url, headers=service.headers(service.alice))
            assert r.status_code == 503, (url, r.text)
            assert r.json()["error"]["code"] == "database_unavailable" and int(r.headers["retry-after"]) > 0


def test_quotas_and_rate_limits_answer_429(migrated: str, redis_url: str, tmp_path: Any, service: Service,
                                           model_id: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    from .conftest import make_tenant, service_env

    env = service_env(migrated, redis_url, tmp_path / "blobs")
    base = {k.removeprefix("CDI_").lower(): v for k, v in env.items()}
    carol = make_tenant(migrated, "carol")
    try:
        with TestClient(create_app(Settings(**{**base, "max_concurrent_audits": 1}))) as client:
            assert _submit(service, carol, client=client, model=model_id).status_code == 202
            r = _submit(service, carol, client=client, model=model_id)
            assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
            assert int(r.headers["retry-after"]) > 0
            # Another tenant is not affected.
            r = _submit(service, make_tenant(migrated, "dave"), client=client, model=model_id)
            assert r.status_code == 202, r.text
        with TestClient(create_app(Settings(**{**base, "max_images_per_day": 40}))) as client:
            r = _submit(service, carol, client=client, model=model_id)  # 30 today already + 30
            assert r.status_code == 429 and "today" in r.json()["error"]["message"]
        with TestClient(create_app(Settings(**{**base, "max_stored_bytes": 2000}))) as client:
            r = _submit(service, carol, client=client, model=model_id)
            assert r.status_code == 429 and "stored" in r.json()["error"]["message"]
        with TestClient(create_app(Settings(**{**base, "rate_limit_per_minute": 3}))) as client:
            codes = [client.get("/v1/audits", headers=service.headers(carol)).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and codes[3] == 429
            r = client.get("/v1/audits", headers=service.headers(carol))
            assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
            assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
    finally:
        service.purge()


def test_padded_images_hit_the_per_image_byte_limit(migrated: str, redis_url: str, tmp_path: Any,
                                                    service: Service, model_id: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    from .conftest import service_env

    env = service_env(migrated, redis_url, tmp_path / "blobs")
    base = {k.removeprefix("CDI_").lower(): v for k, v in env.items()}
    members = {f"published/p{i:03d}.png": png(5000 + i) for i in range(10)}
    members.update({f"unpublished/u{i:03d}.png": png(6000 + i) for i in range(20)})
    members["published/p000.png"] += b"\x00" * 200_000  # a valid PNG followed by padding
    with TestClient(create_app(Settings(**{**base, "max_image_bytes": 100_000}))) as client:
        r = _submit(service, service.alice, zip_bytes(members), client=client, model=model_id)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
    assert "p000.png" in r.json()["error"]["message"]


def test_delete_removes_everything_and_says_so(service: Service, model_id: str, migrated: str) -> None:
    import numpy as np

    from app.storage.repositories import FeatureRepository

    archive = _fresh_archive()
    r = _submit(service, service.alice, archive, model=model_id)
    assert r.status_code == 202
    audit_id = uuid.UUID(r.json()["id"])
    shared = _submit(service, service.bob, archive, model=model_id).json()["id"]  # same images, other tenant
    with session_scope(migrated) as s:
        shas = sorted({im.sha256 for im in s.scalars(select(AuditImage).where(AuditImage.audit_id == audit_id))})
        FeatureRepository(s).save("key-of-a-test", {sha: np.zeros(26) for sha in shas})
        s.add(AuditRun(audit_id=audit_id, attempt=1, worker="w", outcome="done"))
        s.execute(update(Audit).where(Audit.id == audit_id).values(
            state="done", report={"verdict": "used", "images": shas}, verdict="used", p_value=0.001))
    r = service.client.delete(f"/v1/audits/{audit_id}", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    body = r.json()
    # bob's audit uses the same images: blobs and features stay for it
    assert body["removed"] == {"images": 30, "blobs": 0, "report": 1, "pdf": 0, "runs": 1, "features": 0}
    assert body["deleted_at"] and body["images_deleted"]
    r = service.client.get(f"/v1/audits/{audit_id}/report", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 409 and r.json()["error"]["code"] == "audit_deleted"
    r = service.client.delete(f"/v1/audits/{shared}", headers=service.headers(service.bob))  # type: ignore[attr-defined]
    assert r.json()["removed"] == {"images": 30, "blobs": 30, "report": 0, "pdf": 0, "runs": 0, "features": 30}
    with session_scope(migrated) as s:
        assert s.scalar(select(func.count()).select_from(FeatureRow).where(FeatureRow.sha256.in_(shas))) == 0
        row = s.get(Audit, audit_id)
        assert row is not None and row.report is None and row.deleted_at is not None
    blobs = service.client.app.state.blobs  # type: ignore[attr-defined]
    assert not any(blobs.exists(sha) for sha in shas)
    service.purge()


def test_retain_images_is_recorded(service: Service, model_id: str) -> None:
    r = _submit(service, service.alice, model=model_id, retain_images="true")
    assert r.status_code == 202
    status = service.client.get(r.headers["location"], headers=service.headers(service.alice)).json()  # type: ignore[attr-defined]
    assert status["retain_images"] is True
    r = _submit(service, service.alice, model=model_id)
    status = service.client.get(r.headers["location"], headers=service.headers(service.alice)).json()  # type: ignore[attr-defined]
    assert status["retain_images"] is False
    service.purge()


# --- the reconciler -------------------------------------------------------------------------


def _reconcile(service: Service) -> Any:
    from app.queue import CeleryQueue, make_celery
    from app.reconcile import reconcile
    from app.storage.blobs import open_blob_store
    from app.storage.db import session_factory

    s = service.settings
    queue = CeleryQueue(make_celery(s), s.audit_queue, s.callback_queue)  # type: ignore[attr-defined]
    return reconcile(session_factory(s.database_url), s, open_blob_store(s), queue)  # type: ignore[arg-type, attr-defined]


def _stuck(service: Service) -> list[Any]:
    from app.queue import CeleryQueue, make_celery
    from app.reconcile import find_stuck
    from app.storage.db import session_factory

    s = service.settings
    queue = CeleryQueue(make_celery(s), s.audit_queue, s.callback_queue)  # type: ignore[attr-defined]
    with session_factory(s.database_url)() as session:  # type: ignore[attr-defined]
        return find_stuck(session, s, queue)  # type: ignore[arg-type]


def test_reconciler_sends_again_what_the_broker_lost(service: Service, model_id: str, migrated: str) -> None:
    from datetime import timedelta

    from app.storage.models import utcnow

    service.purge()
    ids = [uuid.UUID(_submit(service, service.alice, model=model_id).json()["id"]) for _ in range(3)]
    assert service.queued() == 3
    with session_scope(migrated) as s:  # they were sent a while ago ...
        s.execute(update(Audit).where(Audit.id.in_(ids)).values(enqueued_at=utcnow() - timedelta(minutes=5)))
    assert not [x for x in _stuck(service) if x.audit_id in ids]  # ... and are still in the broker
    service.purge()  # the broker loses its data (Redis restarted without its append-only file)
    stuck = {x.audit_id: x for x in _stuck(service)}
    assert set(ids) <= set(stuck) and all("not in the broker" in stuck[i].reason for i in ids)
    report = _reconcile(service)
    assert set(ids) <= set(report.requeued)
    assert service.queued() >= 3
    assert not [x for x in _stuck(service) if x.audit_id in ids]
    service.purge()


def test_an_audit_committed_but_never_sent_is_sent_by_the_reconciler(service: Service, model_id: str,
                                                                   migrated: str) -> None:
    """The outbox: an API that dies between its commit and the send loses nothing."""
    from datetime import timedelta

    from app.storage.models import utcnow

    service.purge()
    audit_id = uuid.UUID(_submit(service, service.alice, model=model_id).json()["id"])
    service.purge()
    with session_scope(migrated) as s:  # as if the API died right after committing
        s.execute(update(Audit).where(Audit.id == audit_id).values(
            enqueued_at=None, created_at=utcnow() - timedelta(minutes=2)))
    stuck = {x.audit_id: x for x in _stuck(service)}
    assert stuck[audit_id].action == "send" and "never handed to the broker" in stuck[audit_id].reason
    report = _reconcile(service)
    assert audit_id in report.sent and service.queued() == 1
    with session_scope(migrated) as s:
        assert s.get(Audit, audit_id).enqueued_at is not None  # type: ignore[union-attr]
    service.purge()


def test_spool_files_of_dead_uploads_are_removed(service: Service, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from app.spool import clean_spool, spool_prefix

    tmp = service.settings.upload_tmp_dir  # type: ignore[attr-defined]
    tmp.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp / spool_prefix("upload").replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    orphan.write_bytes(b"x" * 1000)
    mine = tmp / (spool_prefix("upload") + "live")
    mine.write_bytes(b"y")
    old = tmp / "upload-otherhost-1-old"
    old.write_bytes(b"z")
    os.utime(old, (1_000_000, 1_000_000))
    assert clean_spool(service.settings) == 2  # type: ignore[arg-type]
    assert not orphan.exists() and not old.exists() and mine.exists()
    mine.unlink()


def test_api_keys_record_their_last_use(service: Service, migrated: str) -> None:
    from app.storage.models import ApiKey

    key_id = service.bob.key.split("_")[1]
    with session_scope(migrated) as s:
        s.execute(update(ApiKey).where(ApiKey.key_id == key_id).values(last_used_at=None))
    service.client.get("/v1/audits", headers=service.headers(service.bob))  # type: ignore[attr-defined]
    with session_scope(migrated) as s:
        assert s.get(ApiKey, key_id).last_used_at is not None  # type: ignore[union-attr]



def test_registering_a_hub_model_over_http_does_not_fetch_it(service: Service) -> None:
    r = service.client.put("/v1/models/hub-model", headers=service.headers(service.admin),  # type: ignore[attr-defined]
                           json={"id": "hub-model", "source": "some-org/some-model", "revision": "main"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "hub_model_via_cli"


def test_unknown_query_parameters_are_refused(service: Service) -> None:
    r = service.client.get("/v1/audits?limt=5", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_parameter"
    assert "limt" in r.json()["error"]["message"]
    r = service.client.get("/v1/audits?limit=5&state=done", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 200


def test_nameless_query_parameters_are_refused(service: Service) -> None:
    r = service.client.get("/v1/audits?cursor=&=null", headers=service.headers(service.alice))  # type: ignore[attr-defined]
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_parameter"


def test_retention_erases_ended_audits_after_the_tenants_period(service: Service, model_id: str,
                                                                 migrated: str) -> None:
    from datetime import timedelta

    from app.reconcile import expire
    from app.storage.ledger import BlobLedger
    from app.storage.models import utcnow

    from .conftest import make_tenant

    client = service.client
    default, longer, shorter = (make_tenant(migrated, n) for n in ("keep-default", "keep-longer", "keep-shorter"))
    r = client.get("/v1/retention", headers=service.headers(default))  # type: ignore[attr-defined]
    assert r.json() == {"days": 90, "default_days": 90, "max_days": 730, "custom": False}
    r = client.put("/v1/retention", json={"days": 200}, headers=service.headers(longer))  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.json()["days"] == 200 and r.json()["custom"], r.text
    assert client.put("/v1/retention", json={"days": 2}, headers=service.headers(shorter)).status_code == 200  # type: ignore[attr-defined]
    for bad in ({"days": 0}, {"days": 731}, {"days": -1}, {"days": "x"}, {"weeks": 2}):
        r = client.put("/v1/retention", json=bad, headers=service.headers(default))  # type: ignore[attr-defined]
        assert r.status_code == 422, (bad, r.text)
    ended = {}
    for tenant, age in ((default, 100), (default, 80), (longer, 100), (shorter, 3), (shorter, 1)):
        audit_id = uuid.UUID(_submit(service, tenant, model=model_id).json()["id"])
        with session_scope(migrated) as s:
            s.execute(update(Audit).where(Audit.id == audit_id).values(
                state="done", report={"verdict": "not_detected"}, verdict="not_detected",
                finished_at=utcnow() - timedelta(days=age)))
        ended[(tenant.name, age)] = audit_id
    settings = service.settings
    ledger = BlobLedger(client.app.state.session_factory, client.app.state.blobs,  # type: ignore[attr-defined]
                        timedelta(seconds=settings.blob_claim_seconds))  # type: ignore[attr-defined]
    assert expire(client.app.state.session_factory, settings, ledger) >= 2  # type: ignore[attr-defined,arg-type]
    with session_scope(migrated) as s:
        gone = {k for k, a in ended.items() if s.get(Audit, a).deleted_at is not None}  # type: ignore[union-attr]
        images = s.scalar(select(func.count()).select_from(AuditImage).where(
            AuditImage.audit_id == ended[(default.name, 100)]))
    assert gone == {(default.name, 100), (shorter.name, 3)}
    assert images == 0
    r = client.get(f"/v1/audits/{ended[(shorter.name, 3)]}/report", headers=service.headers(shorter))  # type: ignore[attr-defined]
    assert r.status_code == 409 and r.json()["error"]["code"] == "audit_deleted"
    service.purge()
