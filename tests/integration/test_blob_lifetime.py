"""Blob lifetime under concurrency, on the real Postgres: one tenant's DELETE never removes
images that another tenant's upload (committed or not) uses.

The race test runs two tenants against the same images: one stores audits through the
service's storing path (claim, write the blobs, commit the references) and checks after each
commit that every blob its audit references exists; the other stores and deletes audits of
the same images as fast as it can. Before the ledger, the deleter removed blobs between the
uploader's write and its commit, and the new audit then failed with images_missing.

Every test runs against both blob backends: the local folder and an S3 bucket on a real S3
server (moto's server mode), where a write and a delete are HTTP requests that take longer and
open the race's window wider.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.storage.db import session_factory, session_scope
from app.storage.models import Blob, BlobClaim

from .conftest import make_tenant, png

pytestmark = pytest.mark.integration

#: Uploads of the racing tenant per run (the other tenant uploads and deletes meanwhile, as many
#: times as it can). CDI_RACE_ITERATIONS=5000 runs a longer race.
RACE_ITERATIONS = int(os.environ.get("CDI_RACE_ITERATIONS", "200"))
#: The same against S3, where each iteration makes some thirty HTTP requests.
S3_RACE_ITERATIONS = int(os.environ.get("CDI_S3_RACE_ITERATIONS", "40"))


class _Queue:
    def enqueue(self, audit_id: uuid.UUID) -> None:
        pass

    def enqueue_callback(self, audit_id: uuid.UUID) -> None:
        pass

    def ping(self) -> None:
        pass


@pytest.fixture(params=["local", "s3"])
def lifetime(request: pytest.FixtureRequest, migrated: str, tmp_path: Path) -> dict[str, Any]:
    from app.services import AuditService
    from app.settings import Settings
    from app.storage.blobs import open_blob_store

    s3: dict[str, str] = {}
    if request.param == "s3":
        s3 = {k.removeprefix("CDI_").lower(): v for k, v in request.getfixturevalue("s3_env").items()}
    settings = Settings(database_url=migrated, blob_dir=tmp_path / "blobs", data_dir=tmp_path, max_concurrent_audits=0,
                        max_audits_per_day=0, max_images_per_day=0, max_stored_bytes=0, **s3)
    blobs = open_blob_store(settings)
    blobs.check()
    service = AuditService(session_factory(migrated), settings, blobs, _Queue())
    return {"settings": settings, "blobs": blobs, "service": service, "url": migrated, "backend": request.param,
            "iterations": S3_RACE_ITERATIONS if s3 else RACE_ITERATIONS,
            "images": [png(900_000 + i) for i in range(3)]}


def _stage(world: dict[str, Any]) -> Any:
    """The images as an upload stages them: temporary files beside the blobs, hashed."""
    import tempfile

    from app.uploads import StagedImage, StagedUpload

    staged = StagedUpload()
    tmp = world["settings"].upload_tmp_dir
    tmp.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(world["images"]):
        fd, name = tempfile.mkstemp(dir=tmp, prefix="img-test-")
        with open(fd, "wb") as f:
            f.write(data)
        role = "published" if i == 0 else "unpublished"
        staged.images.append(StagedImage(role, f"i{i}.png", Path(name), hashlib.sha256(data).hexdigest(), len(data)))
    return staged


def _store(world: dict[str, Any], tenant_id: uuid.UUID) -> Any:
    staged = _stage(world)
    rows = [(im.role, im.name, im.sha256, im.size, None, None) for im in staged.images]
    try:
        return world["service"]._store(tenant_id, staged, rows, model_id="m", model_source="/m", model_revision=None,
                                       options={"alpha": 0.01}, callback_url=None, retain_images=False)
    finally:
        staged.cleanup()


def _delete(world: dict[str, Any], audit_id: uuid.UUID) -> None:
    from app.storage.repositories import AuditRepository

    with world["service"].session_factory() as session:
        audit = AuditRepository(session).get(audit_id)
        world["service"].delete(session, audit)


def test_delete_races_upload_of_the_same_images(lifetime: dict[str, Any]) -> None:
    alice = make_tenant(lifetime["url"], "race-alice")
    bob = make_tenant(lifetime["url"], "race-bob")
    blobs = lifetime["blobs"]
    missing: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def bob_churns() -> None:
        try:
            while not stop.is_set():
                _delete(lifetime, _store(lifetime, bob.id).id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    shas = sorted({hashlib.sha256(d).hexdigest() for d in lifetime["images"]})
    churn = threading.Thread(target=bob_churns, daemon=True)
    churn.start()
    try:
        for i in range(lifetime["iterations"]):
            audit = _store(lifetime, alice.id)
            for sha in shas:
                if not blobs.exists(sha):
                    missing.append((i, sha))
            _delete(lifetime, audit.id)
            if missing or errors:
                break
    finally:
        stop.set()
        churn.join(timeout=60)
    assert not errors, errors
    assert not missing, f"a committed audit's blob was deleted by the other tenant's DELETE: {missing[:3]}"
    # When both are done, nothing is left behind: no blob, no row, no claim.
    with session_scope(lifetime["url"]) as s:
        rows = s.scalar(select(func.count()).select_from(Blob).where(Blob.sha256.in_(shas)))
        claims = s.scalar(select(func.count()).select_from(BlobClaim))
    assert rows == 0 and claims == 0
    assert not any(blobs.exists(sha) for sha in shas)


def test_a_claim_protects_blobs_written_before_their_references(lifetime: dict[str, Any]) -> None:
    """The window the race test aims at, opened on purpose: blobs written, references not yet."""
    from app.storage.ledger import BlobLedger

    ledger: BlobLedger = lifetime["service"].ledger
    data = png(123_456)
    sha = hashlib.sha256(data).hexdigest()
    claim_id = ledger.claim({sha: len(data)})
    lifetime["blobs"].put_bytes(data)
    assert ledger.collect([sha]) == [] and ledger.sweep() == [] and lifetime["blobs"].exists(sha)
    assert ledger.abandon(claim_id, [sha]) == [sha]
    assert not lifetime["blobs"].exists(sha)


def test_an_expired_claim_refuses_to_commit(lifetime: dict[str, Any]) -> None:
    """An upload slower than its claim must not commit references to blobs a sweep may have taken."""
    from datetime import timedelta

    from app.errors import Unavailable
    from app.storage.ledger import BlobLedger

    alice = make_tenant(lifetime["url"], "slow-alice")
    service = lifetime["service"]
    service.ledger = BlobLedger(service.session_factory, lifetime["blobs"], timedelta(seconds=-1))
    with pytest.raises(Unavailable) as info:
        _store(lifetime, alice.id)
    assert info.value.code == "upload_expired"
    with session_scope(lifetime["url"]) as s:
        assert s.scalar(select(func.count()).select_from(BlobClaim)) == 0


HTTP_ITERATIONS = int(os.environ.get("CDI_RACE_HTTP_ITERATIONS", "10"))


@pytest.mark.parametrize("backend", ["service", "s3_service"])
def test_delete_races_upload_through_the_api(backend: str, request: pytest.FixtureRequest, migrated: str) -> None:
    """The same race through HTTP: bob submits and deletes the images alice keeps submitting."""
    import random

    service = request.getfixturevalue(backend)
    from app.storage.models import AuditImage
    from app.storage.repositories import ModelRepository

    from .conftest import synthetic_archive

    with session_scope(migrated) as s:
        ModelRepository(s).upsert("race-model", source="/nonexistent/race-model", revision=None, family="pixel",
                                  conditioning="none", description="race tests only")
    archive = synthetic_archive(offset=random.randrange(10**6, 10**9))
    client, blobs = service.client, service.client.app.state.blobs
    files = {"archive": ("a.zip", archive, "application/zip")}
    stop = threading.Event()
    errors: list[str] = []

    def bob() -> None:
        while not stop.is_set():
            r = client.post("/v1/audits", headers=service.headers(service.bob), files=files,
                            data={"model": "race-model"})
            if r.status_code != 202:
                errors.append(r.text)
                return
            client.delete(f"/v1/audits/{r.json()['id']}", headers=service.headers(service.bob))

    t = threading.Thread(target=bob, daemon=True)
    t.start()
    missing = []
    try:
        for _ in range(HTTP_ITERATIONS):
            r = client.post("/v1/audits", headers=service.headers(service.alice), files=files,
                            data={"model": "race-model"})
            assert r.status_code == 202, r.text
            with session_scope(migrated) as s:
                audit_id = uuid.UUID(r.json()["id"])
                shas = list(s.scalars(select(AuditImage.sha256).where(AuditImage.audit_id == audit_id)))
            missing += [sha for sha in shas if not blobs.exists(sha)]
            client.delete(f"/v1/audits/{r.json()['id']}", headers=service.headers(service.alice))
    finally:
        stop.set()
        t.join(timeout=120)
    assert not errors, errors[:1]
    assert not missing, f"{len(missing)} blobs of committed audits were deleted by the other tenant"
    service.purge()
