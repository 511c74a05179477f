"""Sharded audits and portable model references, on real processes and real forward passes.

* The same audit run embedded (the library, as ``cdi audit`` runs it), on one worker (one
  shard) and sharded over two worker processes with their own data directories gives the same
  verdict and p-value; the run records show that both workers computed shards.
* One of two workers is SIGKILLed in the middle of a sharded audit: the audit finishes with the
  same verdict, and the run records show that no image's features were computed twice.
* No report JSON, PDF text or status document names a path of the host that made it.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app.client import CdiClient
from app.storage.db import session_scope
from cdi.report import result_to_dict

from .conftest import ROOT, Proc, S3Server, make_tenant, service_env
from .test_end_to_end import (  # noqa: F401 - fixtures
    N_PUBLISHED,
    N_UNPUBLISHED,
    SEED,
    WAIT,
    assert_same_verdict,
    dataset,
    reference,
    zoo_model,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = N_PUBLISHED + N_UNPUBLISHED
#: Small shards, so that both workers get some: 30 images in 8 shards.
SHARD_SIZE = "4"


@pytest.fixture
def env(migrated: str, redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    e = service_env(migrated, redis_url, tmp_path / "api" / "blobs")
    yield e
    import redis

    redis.Redis.from_url(redis_url).delete(e["CDI_AUDIT_QUEUE"], e["CDI_CALLBACK_QUEUE"])


def _cold_cache(url: str) -> None:
    with session_scope(url) as s:
        s.execute(text("DELETE FROM features"))


def _features(url: str) -> int:
    with session_scope(url) as s:
        return int(s.execute(text("SELECT count(*) FROM features")).scalar_one())


def _runs(url: str, audit_id: str) -> list[Any]:
    with session_scope(url) as s:
        return list(s.execute(text(
            "SELECT attempt, shard, worker, outcome, features_computed, features_reused, forward_passes "
            "FROM audit_runs WHERE audit_id = :a ORDER BY attempt"), {"a": uuid.UUID(audit_id)}).all())


def _two_workers(start_worker: Callable[..., Proc], env: dict[str, str], tmp_path: Path, migrated: str,
                 *, own_blobs: bool = False, **extra: str) -> tuple[Proc, Proc]:
    """Two worker processes, each with its own data directory (and blob folder, with
    ``own_blobs``: the blobs are in an object store), both ready before returning (so that the
    first does not take every shard while the second starts)."""
    procs = []
    for name in ("shardA", "shardB"):
        data = tmp_path / name
        data.mkdir()
        own = {"CDI_BLOB_DIR": str(data / "blobs")} if own_blobs else {}
        procs.append(start_worker(env, name, CDI_DATA_DIR=str(data), CDI_SHARD_SIZE=SHARD_SIZE, **own, **extra))
    deadline = time.monotonic() + 120
    while True:
        with session_scope(migrated) as s:
            ready = {n for n in ("shardA", "shardB") if s.execute(
                text("SELECT count(*) FROM worker_heartbeats WHERE name LIKE :n"), {"n": f"{n}-%"}).scalar_one()}
        if len(ready) == 2:
            return procs[0], procs[1]
        assert time.monotonic() < deadline, [p.output()[-2000:] for p in procs]
        time.sleep(0.3)


def _host_paths(*extra: Path) -> list[str]:
    import site
    import tempfile

    paths = {str(ROOT), "site-packages", "/tmp", tempfile.gettempdir(), str(Path.home()),
             *(str(p) for p in extra)}
    paths.update(site.getsitepackages())
    return sorted(p for p in paths if p and p != "/")


def assert_no_host_paths(what: str, content: str, forbidden: list[str]) -> None:
    for path in forbidden:
        assert path not in content, f"the {what} names a path of this host ({path!r})"


def _pdf_text(data: bytes) -> str:
    import pypdf

    return "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(data)).pages)


def _check_documents(client: CdiClient, audit_id: str, forbidden: list[str], model_id: str) -> dict[str, Any]:
    status = client.status(audit_id)
    report = client.report(audit_id)
    pdf = _pdf_text(client.report_pdf(audit_id))
    assert "verdict" in pdf.lower() or report["verdict"] in pdf
    assert_no_host_paths("status document", json.dumps(status), forbidden)
    assert_no_host_paths("report", json.dumps(report), forbidden)
    assert_no_host_paths("PDF", pdf, forbidden)
    # The model is named by its registered id, and identified by its weights.
    model = report["manifest"]["model"]
    assert model["source"] == model_id
    assert model["weight_sha256"] and all(len(h) == 64 for h in model["weight_sha256"].values())
    return report


def test_embedded_one_worker_and_sharded_agree(env: dict[str, str], start_api: Callable[[dict[str, str]], str],
                                               start_worker: Callable[..., Proc],
                                               dataset: dict[str, Any], reference: Any,  # noqa: F811
                                               zoo_model: Any, migrated: str, tmp_path: Path,  # noqa: F811
                                               s3_server: S3Server) -> None:
    """(b) and (c) keep their blobs in an S3 bucket; the API and every worker have their own
    data folder, as on separate hosts: they share Postgres, Redis and the bucket only."""
    bucket = s3_server.new_bucket()
    env = {**env, **s3_server.env(bucket)}
    forbidden = _host_paths(tmp_path, Path(str(zoo_model.path)))
    # (a) embedded: the library's report names the shipped model, not where it is installed.
    assert_no_host_paths("library's report", json.dumps(result_to_dict(reference)), forbidden)
    assert result_to_dict(reference)["manifest"]["model"]["source"] == zoo_model.name

    tenant = make_tenant(migrated, "shards")
    base = start_api(_host(env, tmp_path / "api-host"))
    with CdiClient(base, tenant.key) as client:
        # (b) one worker, the default shard size: one task does the whole audit.
        _cold_cache(migrated)
        single = start_worker(_host(env, tmp_path / "single-host"), "single")
        one = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED)["id"]
        status = client.wait(one, poll=0.5, timeout=WAIT)
        assert status["state"] == "done", (status, single.output()[-4000:])
        assert_same_verdict(_check_documents(client, one, forbidden, zoo_model.name), reference)
        single.stop()
        runs = _runs(migrated, one)
        assert [r.shard for r in runs] == [None] and runs[0].features_computed == TOTAL

        # (c) sharded over two workers with their own data directories, the cache cold again.
        _cold_cache(migrated)
        a, b = _two_workers(start_worker, env, tmp_path, migrated, own_blobs=True)
        sharded = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED)["id"]
        progress: list[tuple[int, int]] = []
        status = client.wait(sharded, poll=0.3, timeout=WAIT,
                             on_status=lambda s: progress.append((s["progress"]["done"], s["progress"]["total"])))
        assert status["state"] == "done", (status, a.output()[-3000:], b.output()[-3000:])
        assert_same_verdict(_check_documents(client, sharded, forbidden, zoo_model.name), reference)

    runs = _runs(migrated, sharded)
    shard_runs = [r for r in runs if r.shard is not None]
    # Every shard finished once. On a loaded machine a shard whose lease (seconds, in the tests)
    # ran out while it wrote its last batch is taken over: that attempt reads "crashed", the
    # next one finds the work stored, and no image is computed twice (checked below).
    assert sorted(r.shard for r in shard_runs if r.outcome == "done") == list(range(8)), runs
    assert all(r.outcome in ("done", "crashed") for r in shard_runs), runs
    # Both workers computed shards (their pool processes are the run records' workers).
    assert len({r.worker.rsplit(":", 1)[0] for r in shard_runs}) == 2, [r.worker for r in shard_runs]
    # Every image computed once, by a shard; the final step computed nothing.
    assert sum(r.features_computed for r in shard_runs) == TOTAL
    final = runs[-1]
    assert final.shard is None and final.outcome == "done"
    assert final.features_computed == 0 and final.features_reused == TOTAL and final.forward_passes == 0
    # GM recomputes a near-tie mask alone, and which masks are near ties depends a little on
    # the batch, so the passes match the single run's to within a few recomputations.
    lost = sum(r.features_computed for r in shard_runs if r.outcome == "crashed")
    assert sum(r.forward_passes for r in shard_runs) == pytest.approx(
        int(reference.forward_passes) * (TOTAL - lost) / TOTAL, rel=0.02)
    # Progress counted images across shards.
    assert any(0 < done < TOTAL and total == TOTAL for done, total in progress), progress
    # Nothing went through a host's disk: the images and PDFs are in the bucket only.
    for host in ("api-host", "single-host", "shardA", "shardB"):
        blobs = tmp_path / host / "blobs"
        assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()], host
    assert s3_server.keys(bucket)


def _host(env: dict[str, str], root: Path) -> dict[str, str]:
    """``env`` for a process on its own host: its own data folder, nothing shared on disk."""
    return {**env, "CDI_DATA_DIR": str(root), "CDI_BLOB_DIR": str(root / "blobs")}


def _pool_parent(worker: str) -> int:
    """The main Celery process of the pool process named in a run record (``host:pid:tag``)."""
    pid = int(worker.split(":")[1])
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_sigkill_one_of_two_workers(env: dict[str, str], start_api: Callable[[dict[str, str]], str],
                                    start_worker: Callable[..., Proc],
                                    dataset: dict[str, Any], reference: Any,  # noqa: F811
                                    zoo_model: Any, migrated: str, tmp_path: Path) -> None:  # noqa: F811
    _cold_cache(migrated)
    tenant = make_tenant(migrated, "shard-kill")
    base = start_api(env)
    a, b = _two_workers(start_worker, env, tmp_path, migrated, CDI_WORKER_BATCH_SIZE="2")
    with CdiClient(base, tenant.key) as client:
        audit_id = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED)["id"]
        # Wait until a shard is half done: one batch of it stored, its run still going.
        deadline = time.monotonic() + WAIT
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, (a.output()[-3000:], b.output()[-3000:])
            assert client.status(audit_id)["state"] != "done", "finished before a worker could be killed"
            for r in _runs(migrated, audit_id):
                if r.shard is not None and r.outcome is None and 0 < r.features_computed < int(SHARD_SIZE):
                    victim = r
                    break
            else:
                time.sleep(0.05)
        parent = _pool_parent(victim.worker)
        doomed = next(p for p in (a, b) if p.popen.pid == parent)
        doomed.kill()
        status = client.wait(audit_id, poll=0.5, timeout=WAIT)
        survivor = b if doomed is a else a
        assert status["state"] == "done", (status, survivor.output()[-4000:])
        assert_same_verdict(client.report(audit_id), reference)

    runs = _runs(migrated, audit_id)
    # The operator sees the same records: every shard, its worker, the killed attempt.
    import os
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "app.cli", "admin", "runs", audit_id], cwd=ROOT,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()[1:]
    crashed = [r for r in runs if r.outcome == "crashed"]
    assert len(lines) == len(runs) and sum("crashed" in line for line in lines) == len(crashed), shown.stdout
    assert {r.worker for r in runs} <= {line.split()[-1] for line in lines}
    killed = [r for r in runs if r.attempt == victim.attempt]
    assert killed[0].outcome == "crashed", runs  # marked when its shard was taken over
    # Besides the killed attempt, a live shard whose heartbeat came late on a loaded machine may
    # have lost its (seconds-long) lease and been taken over: also "crashed", its work kept.
    redone = [r for r in runs if r.shard == victim.shard and r.outcome == "done" and r.features_reused]
    assert len(redone) == 1 and redone[0].worker != victim.worker
    # The killed shard's stored features were read back, not computed again...
    assert redone[0].features_reused >= killed[0].features_computed > 0
    # ... and no image's features were computed twice, anywhere.
    assert sum(r.features_computed for r in runs) == TOTAL, runs
    done_passes = sum(r.forward_passes for r in runs if r.outcome == "done")
    assert done_passes < int(reference.forward_passes)
    per_image = int(reference.forward_passes) / TOTAL
    lost = sum(r.features_computed for r in crashed)
    assert done_passes == pytest.approx(per_image * (TOTAL - lost), rel=0.02)


# --- portable model references ----------------------------------------------------------------


def test_the_api_accepts_an_audit_from_the_registry_alone(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model registered under a path this host does not have (a worker's mount) is accepted:
    the API reads the registry only, and never reads, loads or hashes weights."""
    import random
    import sys

    from app.storage.models import Audit
    from app.storage.repositories import ModelRepository
    from cdi.models import detect

    from .conftest import synthetic_archive

    with session_scope(service.settings.database_url) as s:
        ModelRepository(s).upsert("mounted-model", source="/mnt/models/not-on-this-host", revision=None,
                                  family="pixel", conditioning="none",
                                  weight_sha256={"unet/diffusion_pytorch_model.safetensors": "ab" * 32})

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the API read a model's files")

    for name in ("detect_family", "resolve_reference", "read_json"):
        monkeypatch.setattr(detect, name, refuse)
    loading = sys.modules.get("cdi.models.loading")  # hashing lives there, with torch
    if loading is not None:
        for name in ("weight_hashes", "file_sha256", "identity_of"):
            monkeypatch.setattr(loading, name, refuse)
    torch_before = "torch" in sys.modules
    archive = synthetic_archive(offset=random.randrange(10**6, 10**9))
    r = service.client.post("/v1/audits", headers=service.headers(service.alice),
                            files={"archive": ("a.zip", archive)}, data={"model": "mounted-model", "seed": "1"})
    assert r.status_code == 202, r.text
    assert torch_before or "torch" not in sys.modules
    status = service.client.get(f"/v1/audits/{r.json()['id']}", headers=service.headers(service.alice)).json()
    assert status["model"] == "mounted-model" and "/mnt/models" not in json.dumps(status)
    with session_scope(service.settings.database_url) as s:
        audit = s.get(Audit, uuid.UUID(r.json()["id"]))
        assert audit is not None and audit.model_source == "/mnt/models/not-on-this-host"
    service.purge()


def test_a_worker_refuses_weights_other_than_the_registered_ones(migrated: str, tmp_path: Path,
                                                                 zoo_model: Any) -> None:  # noqa: F811
    """A path names a file on each host: the registered weight hashes say whether it is the same file."""
    import shutil

    from app.registry import ModelRegistry
    from app.settings import Settings
    from app.storage.blobs import open_blob_store
    from app.storage.db import session_factory
    from app.storage.repositories import AuditRepository
    from cdi.models.detect import detect_family
    from cdi.models.loading import weight_hashes
    from worker.models import get_model
    from worker.runner import AuditRunner, Job, JobModel

    from .conftest import png

    copy = tmp_path / "mounted" / "model"
    shutil.copytree(Path(str(zoo_model.path)), copy)
    settings = Settings(database_url=migrated, blob_dir=tmp_path / "blobs", worker_device="cpu")
    model_id = f"mounted-{uuid.uuid4().hex[:6]}"
    with session_scope(migrated) as s:
        ModelRegistry(s, settings).register(model_id, str(copy), hash_weights=True)
    with session_scope(migrated) as s:
        from app.storage.repositories import ModelRepository

        row = ModelRepository(s).get(model_id)
        assert row is not None and row.weight_sha256 == weight_hashes(detect_family(str(copy)))
    runner = AuditRunner(settings, session_factory(migrated), open_blob_store(settings), get_model)
    job = Job(model=JobModel(model_id, str(copy), None, row.weight_sha256), reference=None, options={},
              published=(), unpublished=(), captions={}, labels={})
    adapter, _ = runner._models(job, "cpu")  # the registered weights load
    assert dict(adapter.identity.weight_sha256) == row.weight_sha256

    # The same path on another host holds other weights: the audit fails, naming the file.
    weight = next(p for p in copy.rglob("*.safetensors"))
    data = bytearray(weight.read_bytes())
    data[-1] ^= 0xFF
    weight.write_bytes(bytes(data))
    blobs = open_blob_store(settings)
    rows = []
    for i in range(TOTAL):
        image = png(7000 + i)
        role = "published" if i < N_PUBLISHED else "unpublished"
        rows.append((role, f"{role[0]}{i}.png", blobs.put_bytes(image), len(image), None, None))
    with session_scope(migrated) as s:
        tenant = make_tenant(migrated, "mounted")
        audit_id = AuditRepository(s).create(
            tenant_id=tenant.id, model_id=model_id, model_source=str(copy), model_revision=None,
            options={"alpha": 0.01, "protocol": "directional", "features": "all", "seed": SEED},
            callback_url=None, images=rows).id
    from cdi.models import load_model

    fresh = AuditRunner(settings, session_factory(migrated), blobs,
                        lambda source, revision, device: load_model(source, revision=revision, device=device))
    assert fresh.run(audit_id) == "failed"
    with session_scope(migrated) as s:
        audit = AuditRepository(s).get(audit_id)
        assert audit is not None and audit.error_code == "model_changed", audit.error_message
        assert weight.relative_to(copy).as_posix() in (audit.error_message or "")
        assert str(tmp_path) not in (audit.error_message or "")


def test_deleting_a_sharded_audit_stops_every_shard(env: dict[str, str], start_api: Callable[[dict[str, str]], str],
                                                    start_worker: Callable[..., Proc],
                                                    dataset: dict[str, Any], zoo_model: Any,  # noqa: F811
                                                    migrated: str, tmp_path: Path) -> None:
    """DELETE (cancel, then erase) while shards run on two workers: both stop at their next
    heartbeat, nothing is scored, and the features stop growing."""
    _cold_cache(migrated)
    tenant = make_tenant(migrated, "shard-delete")
    base = start_api(env)
    a, b = _two_workers(start_worker, env, tmp_path, migrated, CDI_WORKER_BATCH_SIZE="2")
    with CdiClient(base, tenant.key) as client:
        audit_id = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED)["id"]
        deadline = time.monotonic() + WAIT
        while _features(migrated) < 2:
            assert time.monotonic() < deadline, (a.output()[-3000:], b.output()[-3000:])
            time.sleep(0.05)
        client.cancel(audit_id)  # DELETE
        # Each shard stops at its next heartbeat, after at most the batch it is computing.
        settled, since = _features(migrated), time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() - since < 4:
            assert time.monotonic() < deadline, "the shards kept computing after the DELETE"
            time.sleep(0.2)
            if (now := _features(migrated)) != settled:
                settled, since = now, time.monotonic()
        assert settled < TOTAL
        status = client.status(audit_id)
    assert status["state"] == "cancelled" and status["verdict"] is None and status["deleted_at"]
    with session_scope(migrated) as s:
        left = s.execute(text("SELECT count(*) FROM audit_shards WHERE audit_id = :a"),
                         {"a": uuid.UUID(audit_id)}).scalar_one()
    assert left == 0  # the shards went with the audit's data
    for proc in (a, b):
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


# --- the completion check in the database -------------------------------------------------------


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None]] = []

    def enqueue(self, audit_id: uuid.UUID) -> None:
        self.sent.append((str(audit_id), None))

    def enqueue_shard(self, audit_id: uuid.UUID, shard: int) -> None:
        self.sent.append((str(audit_id), shard))


def _split_audit(migrated: str, n_shards: int) -> uuid.UUID:
    from datetime import timedelta

    from app.storage.repositories import AuditRepository, ShardRepository

    tenant = make_tenant(migrated, "split")
    rows = [("published" if i % 3 else "unpublished", f"i{i}.png", f"{i:064x}", 1, None, None)
            for i in range(2 * n_shards)]
    with session_scope(migrated) as s:
        audit = AuditRepository(s).create(tenant_id=tenant.id, model_id="m", model_source="m", model_revision=None,
                                          options={"seed": 1}, callback_url=None, images=rows)
        assert AuditRepository(s).claim(audit.id, "splitter", timedelta(seconds=30))
        ShardRepository(s).ensure(audit.id, 2 * n_shards, 2, passes=1)
        assert ShardRepository(s).hand_to_shards(audit.id, "splitter", timedelta(seconds=30))
        return audit.id


def test_of_two_shards_finishing_at_once_exactly_the_later_sees_all_done(migrated: str) -> None:
    """The last two shards complete in overlapping transactions: the audit's row lock orders
    them, and only the second sends the final step."""
    import threading
    from datetime import timedelta

    from app.storage.db import session_factory
    from app.storage.repositories import ShardRepository

    audit_id = _split_audit(migrated, 2)
    factory = session_factory(migrated)
    with session_scope(migrated) as s:
        assert ShardRepository(s).claim(audit_id, 0, "w0", timedelta(seconds=30))
        assert ShardRepository(s).claim(audit_id, 1, "w1", timedelta(seconds=30))
    results: dict[str, tuple[bool, bool]] = {}
    first = factory()
    results["first"] = ShardRepository(first).complete(audit_id, 0, "w0")  # not committed yet

    def second() -> None:
        with factory() as s:
            results["second"] = ShardRepository(s).complete(audit_id, 1, "w1")
            s.commit()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "the second completion did not wait for the first's lock"
    first.commit()
    first.close()
    t.join(10)
    assert results == {"first": (True, False), "second": (True, True)}
    with session_scope(migrated) as s:
        from app.storage.models import Audit

        audit = s.get(Audit, audit_id)
        assert audit is not None and audit.progress_done == audit.progress_total == 4
        assert not ShardRepository(s).complete(audit_id, 1, "w1")[0]  # done already: not twice


def test_a_redelivered_shard_sends_the_final_step_and_orphans_are_sent_once(migrated: str, tmp_path: Path) -> None:
    from datetime import timedelta

    from app.settings import Settings
    from app.storage.blobs import open_blob_store
    from app.storage.db import session_factory
    from app.storage.repositories import AuditRepository, ShardRepository
    from worker.runner import AuditRunner

    audit_id = _split_audit(migrated, 3)
    settings = Settings(database_url=migrated, blob_dir=tmp_path / "blobs", worker_device="cpu", lease_seconds=3)
    queue = RecordingQueue()
    runner = AuditRunner(settings, session_factory(migrated), open_blob_store(settings),
                         lambda *_: None, queue=queue)  # type: ignore[arg-type,return-value]
    with session_scope(migrated) as s:
        shards = ShardRepository(s)
        assert shards.claim(audit_id, 0, "dead", timedelta(seconds=-1))  # its lease ran out: it died
        assert shards.claim(audit_id, 1, "alive", timedelta(seconds=30))
        assert shards.claim(audit_id, 2, "done", timedelta(seconds=30))
        assert shards.complete(audit_id, 2, "done") == (True, False)
    with session_scope(migrated) as s:
        assert ShardRepository(s).orphans(audit_id) == [0]
    with session_scope(migrated) as s:
        assert ShardRepository(s).orphans(audit_id) == []  # released once: sent by one worker only
    # A shard another live worker holds is busy; a done shard is skipped.
    assert runner.run_shard(audit_id, 1) == "busy"
    assert runner.run_shard(audit_id, 2) == "skipped" and queue.sent == []
    with session_scope(migrated) as s:
        shards = ShardRepository(s)
        assert shards.claim(audit_id, 0, "w0", timedelta(seconds=30))
        assert shards.complete(audit_id, 0, "w0") == (True, False)
        assert shards.complete(audit_id, 1, "alive") == (True, True)
    # The worker that completed the last shard died before sending the final step: its
    # redelivered task sends it.
    assert runner.run_shard(audit_id, 1) == "skipped"
    assert queue.sent == [(str(audit_id), None)]
    # The shards' lease on the audit ran out at once: the final step can take the audit.
    with session_scope(migrated) as s:
        assert AuditRepository(s).claim(audit_id, "final", timedelta(seconds=30))
