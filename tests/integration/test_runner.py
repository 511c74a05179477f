"""The worker's audit runner on the real Postgres, with a scripted stand-in for the library.

What is tested here is the runner's own contract (lease, idempotence, progress, the
feature store, cancellation, failure codes, report and PDF), so the library's ``audit`` is
replaced by a function that drives the same callbacks; the end-to-end tests run the real one.
"""

from __future__ import annotations

import sys
import threading
import types
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.storage.blobs import BlobStore, LocalBlobStore
from app.storage.db import session_factory, session_scope
from app.storage.models import AuditState
from app.storage.repositories import AuditRepository, FeatureRepository
from worker.runner import AuditRunner

from .conftest import make_tenant, png

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Options:
    alpha: float = 0.01
    protocol: str = "crossfit"
    features: Any = "all"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    sequential: bool = False
    looks: int = 4
    spending: str = "obrien-fleming"
    futility: bool = False


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Passes:
    forward: int
    backward: int


class Result:
    def __init__(self, passes: Passes) -> None:
        self.forward_passes, self.backward_passes = passes.forward, passes.backward
        self.verdict = "not_detected"
        self.p_value = np.float64(0.42)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "p_value": self.p_value, "statistic": np.float32(1.5),
                "n": np.int64(3), "nan": float("nan")}


@pytest.fixture
def fake_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for ``cdi.audit``'s option and progress types and for the report of a result."""
    module = types.ModuleType("cdi.audit")
    module.AuditOptions = Options  # type: ignore[attr-defined]
    module.Progress = Progress  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cdi.audit", module)
    # The stand-in result is no AuditResult: its report is its own ``to_dict``.
    monkeypatch.setattr("worker.runner.result_to_dict", lambda result: result.to_dict())


class ScriptedAudit:
    """Stands in for ``cdi.audit.audit``: reads every image, uses the feature store per batch."""

    def __init__(self, batch: int = 2, stop_after: int | None = None, raise_exc: Exception | None = None) -> None:
        self.batch = batch
        self.stop_after = stop_after
        self.raise_exc = raise_exc
        self.computed: list[str] = []
        self.gate = threading.Event()
        self.calls: list[dict[str, Any]] = []

    def __call__(self, published: Sequence[Any], unpublished: Sequence[Any], model: Any, *,
                 captions: Mapping[str, str] | None = None, labels: Mapping[str, int] | None = None,
                 options: Options, progress: Any, feature_store: Any, revision: Any = None,
                 reference_model: Any = None, model_name: str | None = None,
                 reference_name: str | None = None) -> Result:
        self.calls.append({"captions": captions, "labels": labels, "options": options, "model": model})
        files = list(published) + list(unpublished)
        progress(Progress("validating", len(files), len(files)))
        if self.raise_exc is not None:
            raise self.raise_exc
        key = f"model-x|layout|{options.seed}|{options.features}"
        shas = [f.sha256 for f in files]
        cached = feature_store.load(key, shas)
        todo = [s for s in shas if s not in cached]
        done = len(cached)
        for i in range(0, len(todo), self.batch):
            chunk = todo[i:i + self.batch]
            if self.stop_after is not None and done >= self.stop_after:
                self.gate.wait(timeout=30)
            feature_store.save(key, {s: np.full(26, float(int(s[:6], 16)), dtype=np.float64) for s in chunk})
            self.computed += chunk
            done += len(chunk)
            progress(Progress("extracting", done, len(files)))
        progress(Progress("scoring", 1, 1))
        progress(Progress("testing", 1, 1))
        return Result(Passes(forward=len(todo) * 51, backward=len(todo) * 10))


@pytest.fixture
def world(migrated: str, tmp_path: Path, fake_library: None) -> Iterator[dict[str, Any]]:
    from app.settings import Settings

    settings = Settings(database_url=migrated, blob_dir=tmp_path / "blobs", lease_seconds=3,
                        worker_device="cpu")
    blobs: BlobStore = LocalBlobStore(settings.blobs)
    tenant = make_tenant(migrated, "runner")
    yield {"settings": settings, "blobs": blobs, "tenant": tenant, "url": migrated}


def new_audit(world: dict[str, Any], n_p: int = 4, n_u: int = 4, seed: int | None = None,
              captions: bool = False, options: dict[str, Any] | None = None) -> uuid.UUID:
    blobs: BlobStore = world["blobs"]
    offset = seed if seed is not None else uuid.uuid4().int % 10_000
    rows = []
    for i in range(n_p + n_u):
        data = png(offset * 16 + i)
        sha = blobs.put_bytes(data)
        role = "published" if i < n_p else "unpublished"
        rows.append((role, f"{role[0]}{i}.png", sha, len(data), "a caption" if captions and i == 0 else None, None))
    with session_scope(world["url"]) as s:
        audit = AuditRepository(s).create(
            tenant_id=world["tenant"].id, model_id="m", model_source="/models/m", model_revision=None,
            options={"alpha": 0.01, "protocol": "crossfit", "features": "all", "seed": offset, **(options or {})},
            callback_url=None, images=rows)
        return audit.id


def runner(world: dict[str, Any], audit_fn: Any, name: str = "test-worker") -> AuditRunner:
    loads: list[tuple[str, str | None, str]] = []

    def load(source: str, revision: str | None, device: str) -> Any:
        loads.append((source, revision, device))
        return object()

    r = AuditRunner(world["settings"], session_factory(world["url"]), world["blobs"], load, audit_fn, name=name)
    r.loads = loads  # type: ignore[attr-defined]
    return r


def audit_row(world: dict[str, Any], audit_id: uuid.UUID) -> Any:
    from sqlalchemy.orm import undefer

    from app.storage.models import Audit

    with session_scope(world["url"]) as s:
        # The whole row, report included (deferred otherwise), to read after the session.
        audit = s.get(Audit, audit_id, options=[undefer(Audit.report)])
        runs = AuditRepository(s).runs(audit_id)
        s.expunge_all()
        return audit, runs


def test_a_run_stores_report_pdf_progress_and_run_record(world: dict[str, Any]) -> None:
    audit_id = new_audit(world, captions=True)
    fn = ScriptedAudit()
    r = runner(world, fn)
    assert r.run(audit_id) == "done"
    audit, runs = audit_row(world, audit_id)
    assert audit.state == "done" and audit.verdict == "not_detected" and audit.p_value == pytest.approx(0.42)
    assert audit.report["statistic"] == 1.5 and audit.report["n"] == 3 and audit.report["nan"] is None
    assert world["blobs"].read(audit.report_pdf_sha256).startswith(b"%PDF-1.4")
    assert audit.lease_owner is None and audit.finished_at is not None and audit.started_at is not None
    assert audit.progress_stage == "reporting"
    assert [(x.attempt, x.outcome, x.features_computed, x.features_reused, x.forward_passes) for x in runs] == \
        [(1, "done", 8, 0, 8 * 51)]
    assert fn.calls[0]["captions"] == {"p0.png": "a caption"} and fn.calls[0]["labels"] is None
    assert fn.calls[0]["options"].seed == audit.options["seed"] and fn.calls[0]["options"].device == "cpu"
    assert r.loads == [("/models/m", None, "cpu")]  # type: ignore[attr-defined]
    # Idempotent: a second delivery of the same task does nothing.
    assert r.run(audit_id) == "skipped"
    assert len(fn.calls) == 1


def test_a_sequential_audit_reaches_the_library_with_its_design(world: dict[str, Any]) -> None:
    audit_id = new_audit(world, options={"protocol": "directional", "sequential": True, "looks": 3,
                                         "spending": "pocock", "futility": True})
    fn = ScriptedAudit()
    assert runner(world, fn).run(audit_id) == "done"
    got = fn.calls[0]["options"]
    assert (got.sequential, got.looks, got.spending, got.futility) == (True, 3, "pocock", True)
    # An audit stored before sequential audits existed runs as a fixed one.
    older = new_audit(world)
    fn = ScriptedAudit()
    assert runner(world, fn).run(older) == "done"
    assert fn.calls[0]["options"].sequential is False


def test_a_held_audit_is_not_run_twice(world: dict[str, Any]) -> None:
    audit_id = new_audit(world)
    with session_scope(world["url"]) as s:
        assert AuditRepository(s).claim(audit_id, "someone-else", timedelta(seconds=60))
    fn = ScriptedAudit()
    assert runner(world, fn).run(audit_id) == "busy"
    assert fn.calls == []


def test_an_expired_lease_is_taken_over_and_features_are_reused(world: dict[str, Any]) -> None:
    audit_id = new_audit(world, n_p=5, n_u=5)
    # A first worker computes 4 images, then dies (its lease is left to run out).
    first = ScriptedAudit(batch=2, stop_after=4)
    r1 = runner(world, first, name="dying-worker")
    t = threading.Thread(target=r1.run, args=(audit_id,), daemon=True)
    t.start()
    deadline = __import__("time").monotonic() + 20
    while len(first.computed) < 4:
        assert __import__("time").monotonic() < deadline
        __import__("time").sleep(0.05)
    with session_scope(world["url"]) as s:  # the "kill": its lease expires
        from sqlalchemy import update

        from app.storage.models import Audit, utcnow

        s.execute(update(Audit).where(Audit.id == audit_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    second = ScriptedAudit(batch=2)
    assert runner(world, second, name="new-worker").run(audit_id) == "done"
    assert sorted(second.computed) == sorted(set(second.computed))
    assert len(second.computed) == 6  # 10 images - 4 stored by the first worker
    first.gate.set()
    t.join(timeout=30)
    audit, runs = audit_row(world, audit_id)
    assert audit.state == "done"
    assert [(x.attempt, x.features_computed, x.features_reused) for x in runs][1] == (2, 6, 4)
    # The first worker noticed that it lost the lease and stopped without touching the result.
    assert runs[0].outcome in ("lost", "superseded")


def test_cancellation_stops_a_running_audit(world: dict[str, Any]) -> None:
    audit_id = new_audit(world, n_p=5, n_u=5)
    fn = ScriptedAudit(batch=2, stop_after=2)
    outcome: list[str] = []
    t = threading.Thread(target=lambda: outcome.append(runner(world, fn).run(audit_id)), daemon=True)
    t.start()
    import time

    deadline = time.monotonic() + 20
    while len(fn.computed) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with session_scope(world["url"]) as s:
        audit = AuditRepository(s).get(audit_id)
        assert audit is not None
        assert AuditRepository(s).cancel(audit)
    time.sleep(world["settings"].lease_seconds / 3 + 1.5)  # a heartbeat sees it
    fn.gate.set()
    t.join(timeout=30)
    assert outcome == ["cancelled"]
    audit, runs = audit_row(world, audit_id)
    assert audit.state == "cancelled" and audit.report is None and runs[0].outcome == "cancelled"


def test_library_errors_fail_the_audit_with_their_code(world: dict[str, Any]) -> None:
    from cdi.errors import CorruptImageError

    audit_id = new_audit(world)
    fn = ScriptedAudit(raise_exc=CorruptImageError("p1.png", "the file is corrupt"))
    assert runner(world, fn).run(audit_id) == "failed"
    audit, runs = audit_row(world, audit_id)
    assert (audit.state, audit.error_code) == ("failed", "image_corrupt")
    assert "p1.png" in audit.error_message and runs[0].outcome == "failed"


def test_unexpected_errors_fail_with_internal_error(world: dict[str, Any]) -> None:
    audit_id = new_audit(world)
    assert runner(world, ScriptedAudit(raise_exc=ZeroDivisionError("x"))).run(audit_id) == "failed"
    audit, _ = audit_row(world, audit_id)
    assert audit.error_code == "internal_error" and "ZeroDivisionError" in audit.error_message


def test_missing_images_fail_cleanly(world: dict[str, Any]) -> None:
    audit_id = new_audit(world)
    with session_scope(world["url"]) as s:
        sha = AuditRepository(s).images(audit_id)[0].sha256
    world["blobs"].delete(sha)
    assert runner(world, ScriptedAudit()).run(audit_id) == "failed"
    assert audit_row(world, audit_id)[0].error_code == "images_missing"


def test_orphans_are_requeued(world: dict[str, Any]) -> None:
    from sqlalchemy import update

    from app.storage.models import Audit, utcnow

    audit_id = new_audit(world)
    with session_scope(world["url"]) as s:
        repo = AuditRepository(s)
        assert repo.claim(audit_id, "dead", timedelta(seconds=1))
        s.execute(update(Audit).where(Audit.id == audit_id).values(
            state=AuditState.EXTRACTING.value, lease_expires_at=utcnow() - timedelta(seconds=30)))
    with session_scope(world["url"]) as s:
        repo = AuditRepository(s)
        assert audit_id in [a.id for a in repo.orphaned(grace=timedelta(seconds=5))]
        assert repo.requeue(audit_id)
    assert audit_row(world, audit_id)[0].state == "queued"


def test_feature_repository_round_trip(migrated: str) -> None:
    rows = {f"{i:064x}": np.arange(26, dtype=np.float64) * i for i in range(3)}
    key = f"some long library key {uuid.uuid4()} " * 20
    with session_scope(migrated) as s:
        FeatureRepository(s).save(key, rows)
        FeatureRepository(s).save(key, rows)  # saving again is no error
    with session_scope(migrated) as s:
        loaded = FeatureRepository(s).load(key, [*rows, "f" * 64])
    assert set(loaded) == set(rows)
    for sha, vec in rows.items():
        np.testing.assert_array_equal(loaded[sha], vec)
        assert loaded[sha].dtype == np.float64


def test_feature_repository_completes_partial_rows(migrated: str) -> None:
    """A row stored with some features (NaN for the rest) is completed by a later save, never overwritten."""
    key = f"partial rows {uuid.uuid4()}"
    sha = "ab" * 32
    partial = np.full(26, np.nan)
    partial[[0, 2, 14]] = [1.0, 2.0, 3.0]
    later = np.arange(26, dtype=np.float64) + 100.0  # a whole row, with other bits for the first three
    with session_scope(migrated) as s:
        FeatureRepository(s).save(key, {sha: partial})
    with session_scope(migrated) as s:
        FeatureRepository(s).save(key, {sha: later})
        FeatureRepository(s).save(key, {sha: np.full(26, np.nan)})  # a row with less changes nothing
    with session_scope(migrated) as s:
        row = FeatureRepository(s).load(key, [sha])[sha]
    expected = later.copy()
    expected[[0, 2, 14]] = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(row, expected)


# --- retention, crashed attempts, image error codes ------------------------------------------


def ledger_audit(world: dict[str, Any], retain: bool, n: int = 8) -> tuple[uuid.UUID, list[str]]:
    """An audit stored the way the API stores one: blobs claimed, written, then referenced."""
    import hashlib

    from app.storage.ledger import BlobLedger, release

    ledger = BlobLedger(session_factory(world["url"]), world["blobs"])
    offset = uuid.uuid4().int % 10**6
    data = [png(10**7 + offset * 16 + i) for i in range(n)]
    shas = [hashlib.sha256(d).hexdigest() for d in data]
    claim_id = ledger.claim({s: len(d) for s, d in zip(shas, data, strict=True)})
    for d in data:
        world["blobs"].put_bytes(d)
    rows = [("published" if i < n // 2 else "unpublished", f"x{i}.png", s, len(d), None, None)
            for i, (s, d) in enumerate(zip(shas, data, strict=True))]
    with session_scope(world["url"]) as s:
        audit = AuditRepository(s).create(
            tenant_id=world["tenant"].id, model_id="m", model_source="/models/m", model_revision=None,
            options={"alpha": 0.01, "protocol": "crossfit", "features": "all", "seed": 1},
            callback_url=None, images=rows, retain_images=retain)
        release(s, claim_id, len(shas))
        return audit.id, shas


@pytest.mark.parametrize("retain", [False, True])
def test_images_are_deleted_when_the_audit_ends_unless_retained(world: dict[str, Any], retain: bool) -> None:
    audit_id, shas = ledger_audit(world, retain)
    assert all(world["blobs"].exists(s) for s in shas)
    assert runner(world, ScriptedAudit()).run(audit_id) == "done"
    audit, _ = audit_row(world, audit_id)
    assert audit.images_deleted is (not retain)
    assert all(world["blobs"].exists(s) is retain for s in shas)
    assert world["blobs"].exists(audit.report_pdf_sha256)  # the report is kept until deleted
    with session_scope(world["url"]) as s:  # what was audited stays on record
        assert len(AuditRepository(s).images(audit_id)) == 8


def test_images_of_a_failed_audit_are_deleted_too(world: dict[str, Any]) -> None:
    audit_id, shas = ledger_audit(world, retain=False)
    assert runner(world, ScriptedAudit(raise_exc=ZeroDivisionError("x"))).run(audit_id) == "failed"
    assert not any(world["blobs"].exists(s) for s in shas)


def test_an_attempt_whose_worker_died_is_recorded_as_crashed(world: dict[str, Any]) -> None:
    from sqlalchemy import update

    from app.storage.models import Audit, utcnow

    audit_id = new_audit(world)
    with session_scope(world["url"]) as s:
        repo = AuditRepository(s)
        assert repo.claim(audit_id, "dead-worker", timedelta(seconds=60))
        repo.start_run(audit_id, 1, "dead-worker")
        s.execute(update(Audit).where(Audit.id == audit_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert runner(world, ScriptedAudit()).run(audit_id) == "done"
    _, runs = audit_row(world, audit_id)
    assert [(r.attempt, r.outcome) for r in runs] == [(1, "crashed"), (2, "done")]
    assert runs[0].finished_at is not None


@pytest.mark.parametrize("damage,code", [
    (lambda b: b[: len(b) // 2], "image_truncated"),
    (lambda b: b[:16] + b"\xff" * 64 + b[80:], "image_corrupt"),
])
def test_undecodable_images_fail_with_the_documented_code(damage: Any, code: str) -> None:
    """The library gathers undecodable images into one error; the worker reports their code."""
    from cdi.audit import AuditOptions, _validate
    from cdi.errors import CdiError
    from cdi.images import ImageFile
    from worker.runner import _classify

    pub = [ImageFile(name=f"p{i}.png", data=png(70_000 + i, size=32)) for i in range(10)]
    unpub = [ImageFile(name=f"u{i}.png", data=png(80_000 + i, size=32)) for i in range(20)]
    pub[3] = ImageFile(name="p3.png", data=damage(pub[3].data))
    with pytest.raises(CdiError) as info:
        _validate(pub, unpub, "none", None, None, AuditOptions(), lambda *a: None)
    got, message = _classify(info.value)
    assert got == code and "p3.png" in message
