"""Tenants share workers, not information: a real worker, the real library and a shipped model.

One run of one worker process answers both questions of a shared service:

* **Fairness**: tenant A queues ten audits, then tenant B one; B's audit starts before A's
  third (app.scheduler: the turn goes to the tenant with the fewest audits running, then the
  one served longest ago).
* **Privacy of the feature cache**: A's first audit and B's are of the same images, against
  the same model, with the same seed. B's audit runs after A's computed every feature, yet its
  report, status and run record are those of an audit nobody ran before: the same features
  computed, none found cached, the same pass counts as A's own first audit (its counterfactual).
  A's DELETE then removes A's cached features and leaves B's report and features whole.
"""

from __future__ import annotations

import time
import uuid
import zipfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.storage.db import session_scope
from app.storage.models import Audit, AuditImage, AuditRun, FeatureRow

from .conftest import Proc, Service, make_tenant

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT = 300.0


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A shipped model's 10 member and 20 held-out images (the smallest audit), zipped."""
    from cdi.zoo import list_models

    models = sorted(list_models(), key=lambda m: (m.family != "pixel", m.conditioning != "none"))
    model = models[0]
    root = tmp_path_factory.mktemp("tenancy")
    model.export(root, members=10, held_out=20)
    pngs = sorted(root.rglob("*.png"))
    sets = sorted({p.parent for p in pngs})
    assert len(sets) == 2, sets
    held_out = next(d for d in sets if "held" in d.name.lower() or "unpub" in d.name.lower())
    path = root / "audit.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for p in pngs:
            zf.write(p, f"{'unpublished' if p.parent == held_out else 'published'}/{p.name}")
    return model.name, path


def _submit(service: Service, tenant: Any, model: str, archive: Path) -> str:
    r = service.client.post(  # type: ignore[attr-defined]
        "/v1/audits", headers=service.headers(tenant),
        data={"model": model, "seed": "3", "features": "gradient-free"},
        files={"archive": ("audit.zip", archive.read_bytes(), "application/zip")})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _status(service: Service, tenant: Any, audit_id: str) -> dict[str, Any]:
    r = service.client.get(f"/v1/audits/{audit_id}", headers=service.headers(tenant))  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_done(service: Service, tenant: Any, audit_id: str, worker: Proc) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while (status := _status(service, tenant, audit_id))["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, worker.output()[-4000:]
        time.sleep(0.3)
    assert status["state"] == "done", (status, worker.output()[-4000:])
    return status


def _run(url: str, audit_id: str) -> AuditRun:
    with session_scope(url) as s:
        runs = list(s.scalars(select(AuditRun).where(AuditRun.audit_id == uuid.UUID(audit_id))))
        s.expunge_all()
    assert len(runs) == 1, runs
    return runs[0]


def _features(url: str, tenant_id: uuid.UUID, shas: set[str]) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(FeatureRow).where(
            FeatureRow.tenant_id == tenant_id, FeatureRow.sha256.in_(shas))) or 0)


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what names the audit or measures its clock."""
    out = {k: v for k, v in report.items() if k not in ("service", "integrity", "created_at")}
    manifest = dict(out.get("manifest") or {})
    manifest.pop("timings_seconds", None)
    out["manifest"] = manifest
    return out


def test_tenants_take_turns_and_see_nothing_of_each_other(
        service: Service, migrated: str, start_worker: Callable[..., Proc], archive: tuple[str, Path]) -> None:
    model, path = archive
    alice, bob = make_tenant(migrated, "fair-a"), make_tenant(migrated, "fair-b")
    a_ids = [_submit(service, alice, model, path) for _ in range(10)]
    b_id = _submit(service, bob, model, path)
    worker = start_worker(service.env, "fair")
    try:
        first = _wait_done(service, alice, a_ids[0], worker)
        b_status = _wait_done(service, bob, b_id, worker)
    finally:
        for a in a_ids[1:]:  # the rest of A's queue is not needed: cancel and erase it
            service.client.delete(f"/v1/audits/{a}", headers=service.headers(alice))  # type: ignore[attr-defined]
    with session_scope(migrated) as s:
        started = {str(a.id): a.started_at for a in s.scalars(select(Audit).where(
            Audit.id.in_([uuid.UUID(x) for x in [*a_ids, b_id]])))}
        shas = set(s.scalars(select(AuditImage.sha256).where(AuditImage.audit_id == uuid.UUID(b_id))))
    # Fairness: B's one audit started before A's third (here, right after A's first).
    assert started[b_id] is not None
    assert started[a_ids[2]] is None or started[b_id] < started[a_ids[2]], started
    assert started[a_ids[0]] is not None and started[a_ids[0]] < started[b_id]
    # "Within one audit's time": B waited for A's first audit alone, not for a second one.
    a_started, a_finished = (datetime.fromisoformat(first[k]) for k in ("started_at", "finished_at"))
    waited = (started[b_id] - a_started).total_seconds()
    one_audit = (a_finished - a_started).total_seconds()
    print(f"B started {waited:.1f} s after A's first audit started; that audit took {one_audit:.1f} s")
    assert waited <= 2 * one_audit

    # Privacy: A computed every feature first; B's audit found none of them.
    a_run, b_run = _run(migrated, a_ids[0]), _run(migrated, b_id)
    assert (a_run.features_computed, a_run.features_reused) == (30, 0)
    assert (b_run.features_computed, b_run.features_reused) == (30, 0)
    assert b_run.forward_passes == a_run.forward_passes > 0
    a_report = service.client.get(f"/v1/audits/{a_ids[0]}/report", headers=service.headers(alice)).json()  # type: ignore[attr-defined]
    b_report = service.client.get(f"/v1/audits/{b_id}/report", headers=service.headers(bob)).json()  # type: ignore[attr-defined]
    assert b_report["manifest"]["passes"]["cached_images"] == 0
    # Timings: the same stages, and B's extraction a computation's, not a cache read's (a cached
    # one took 0.04 s where computing took seconds).
    a_t, b_t = a_report["manifest"]["timings_seconds"], b_report["manifest"]["timings_seconds"]
    assert set(a_t) == set(b_t) and b_t["extracting"] >= 0.25 * a_t["extracting"] > 0, (a_t, b_t)
    assert _comparable(b_report) == _comparable(a_report)
    for key in ("state", "verdict", "p_value", "progress", "n_published", "n_unpublished", "error"):
        assert b_status[key] == first[key], key
    assert _features(migrated, alice.id, shas) == 30 and _features(migrated, bob.id, shas) == 30

    # A's DELETE removes A's features and nothing of B's.
    r = service.client.delete(f"/v1/audits/{a_ids[0]}", headers=service.headers(alice))  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.json()["removed"]["features"] == 30, r.text
    assert _features(migrated, alice.id, shas) == 0 and _features(migrated, bob.id, shas) == 30
    again = service.client.get(f"/v1/audits/{b_id}/report", headers=service.headers(bob))  # type: ignore[attr-defined]
    assert again.status_code == 200 and again.json() == b_report


def test_the_turn_goes_round_robin_to_the_least_served_tenant(migrated: str) -> None:
    """app.scheduler's order on the database alone: fewest running first, then least recently
    served, then each tenant's oldest audit; running, leased and deleted audits are not offered."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.scheduler import fair_choice, next_audits
    from app.storage.models import utcnow
    from app.storage.repositories import AuditRepository

    a, b, c = (make_tenant(migrated, n) for n in ("turn-a", "turn-b", "turn-c"))
    now = utcnow()

    def audit(tenant: Any, minutes_ago: float, **values: Any) -> uuid.UUID:
        with session_scope(migrated) as s:
            row = AuditRepository(s).create(tenant_id=tenant.id, model_id="m", model_source="m", model_revision=None,
                                            options={}, callback_url=None, images=[])
            s.execute(update(Audit).where(Audit.id == row.id).values(
                created_at=now - timedelta(minutes=minutes_ago), **values))
            return row.id

    a_queued = [audit(a, 50 - i) for i in range(4)]
    audit(a, 60, state="extracting", started_at=now - timedelta(minutes=1))  # A has one running
    b_queued = [audit(b, 30), audit(b, 20)]
    audit(b, 70, state="done", started_at=now - timedelta(minutes=40))  # B last served 40 min ago
    c_queued = [audit(c, 10)]  # C never served
    audit(c, 5, deleted_at=now)  # deleted: never offered
    audit(c, 4, lease_owner="w", lease_expires_at=now + timedelta(minutes=5))  # held by a worker
    ours = set(a_queued + b_queued + c_queued)
    with session_scope(migrated) as s:
        order = [x for x in next_audits(s, limit=1000) if x in ours]
        # C (never served) and B (none running) before A (one running); round-robin after that.
        assert order == [c_queued[0], b_queued[0], a_queued[0], b_queued[1], a_queued[1], a_queued[2], a_queued[3]]
        assert fair_choice(s, a_queued[3])[0] != a_queued[3]
        assert fair_choice(s, uuid.uuid4()) == []
