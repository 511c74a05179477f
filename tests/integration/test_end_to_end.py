"""End to end: uvicorn and real Celery workers in subprocesses, the real library and a shipped model.

* Postgres + Redis + an S3 object store, the API and the worker on "hosts" that share no
  filesystem (each its own data folder): submit a zip of a shipped model's member and held-out
  images, poll until done, download the JSON and the PDF; the verdict equals the library's for
  the same inputs and seed; the callback URL receives the final state; the bucket held the
  images and holds the PDF until the audit is deleted.
* SIGKILL: the worker is killed in the middle of feature extraction and a new one started;
  the audit completes with the same verdict and the stored features are not computed again.
* Embedded mode: ``cdi serve`` (SQLite, a SQLite broker, a child worker) gives the same verdict.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app.client import CdiClient
from app.storage.db import session_scope

from .conftest import Proc, S3Server, free_port, make_tenant, service_env, spawn, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 11
N_PUBLISHED, N_UNPUBLISHED = 10, 20  # the smallest sets cdi.stats.check_sizes accepts (crossfit)
WAIT = 300.0


# --- the data: a shipped model, its exported member and held-out images ---------------------


@pytest.fixture(scope="module")
def zoo_model() -> Any:
    from cdi.zoo import list_models

    models = list(list_models())
    assert models, "cdi.zoo ships no model"
    # The cheapest to run: an unconditional pixel-space model if there is one.
    models.sort(key=lambda m: (getattr(m, "family", "") != "pixel", getattr(m, "conditioning", "") != "none"))
    return models[0]


def _image_dirs(root: Path) -> tuple[Path, Path]:
    """The (published, unpublished) folders an export wrote, whatever it calls them."""
    dirs = sorted({p.parent for p in root.rglob("*.png")})
    named = {d.name.lower(): d for d in dirs}
    for pub, unpub in (("published", "unpublished"), ("members", "held_out"), ("member", "held_out"),
                       ("members", "held-out"), ("train", "heldout")):
        if pub in named and unpub in named:
            return named[pub], named[unpub]
    raise AssertionError(f"cannot tell the member and held-out folders apart in {dirs}")


@pytest.fixture(scope="module")
def dataset(zoo_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("export")
    zoo_model.export(root, members=N_PUBLISHED, held_out=N_UNPUBLISHED)
    pub, unpub = _image_dirs(root)
    published = sorted(pub.glob("*.png"))
    unpublished = sorted(unpub.glob("*.png"))
    assert (len(published), len(unpublished)) == (N_PUBLISHED, N_UNPUBLISHED)
    archive = root / "audit.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in published:
            zf.write(p, f"published/{p.name}")
        for p in unpublished:
            zf.write(p, f"unpublished/{p.name}")
    return {"published": published, "unpublished": unpublished, "archive": archive}


@pytest.fixture(scope="module")
def reference(zoo_model: Any, dataset: dict[str, Any]) -> Any:
    """What the library gives for the same inputs and seed (what `cdi audit` prints)."""
    from cdi.audit import AuditOptions, audit
    from cdi.images import ImageFile

    return audit([ImageFile.read(p) for p in dataset["published"]],
                 [ImageFile.read(p) for p in dataset["unpublished"]],
                 str(zoo_model.path), options=AuditOptions(seed=SEED))


def assert_same_verdict(report: dict[str, Any], reference: Any) -> None:
    assert report["verdict"] == reference.outcome
    assert report["p_value"] == pytest.approx(float(reference.p_value), rel=1e-6, abs=1e-12)


def check_pdf(data: bytes) -> None:
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert b"/Type /Page" in data


# --- a callback receiver --------------------------------------------------------------------


class Callbacks:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.event = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                outer.received.append(json.loads(self.rfile.read(length)))
                outer.event.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callbacks() -> Iterator[Callbacks]:
    c = Callbacks()
    yield c
    c.close()


# --- Postgres + Redis -----------------------------------------------------------------------


@pytest.fixture
def pg_env(migrated: str, redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = service_env(migrated, redis_url, tmp_path / "blobs")
    yield env
    import redis

    redis.Redis.from_url(redis_url).delete(env["CDI_AUDIT_QUEUE"], env["CDI_CALLBACK_QUEUE"])


def _host_env(env: dict[str, str], root: Path) -> dict[str, str]:
    """``env`` for a process on its own host: its own data folder, nothing shared on disk."""
    return {**env, "CDI_DATA_DIR": str(root), "CDI_BLOB_DIR": str(root / "blobs")}


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_sequential_audit_on_a_real_worker(pg_env: dict[str, str], start_api: Callable[[dict[str, str]], str],
                                             start_worker: Callable[..., Proc], zoo_model: Any, migrated: str,
                                             tmp_path: Path) -> None:
    """``sequential=true`` in the form reaches a real worker, which runs the looks and records them."""
    from cdi.audit import AuditOptions, audit
    from cdi.images import ImageFile

    # Two looks of at least 10 + 20 images each: the controls of a crossing look need ten per set.
    zoo_model.export(tmp_path / "export", members=20, held_out=40)
    published, unpublished = (sorted(d.glob("*.png")) for d in _image_dirs(tmp_path / "export"))
    archive = tmp_path / "sequential.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for folder, paths in (("published", published), ("unpublished", unpublished)):
            for p in paths:
                zf.write(p, f"{folder}/{p.name}")
    library = audit([ImageFile.read(p) for p in published], [ImageFile.read(p) for p in unpublished],
                    str(zoo_model.path), options=AuditOptions(seed=SEED, sequential=True, looks=2, spending="pocock"))
    tenant = make_tenant(migrated, "sequential")
    base = start_api(pg_env)
    worker = start_worker(pg_env)
    with CdiClient(base, tenant.key) as client:
        accepted = client.submit(model=zoo_model.name, archive=archive, seed=SEED, sequential=True,
                                 looks=2, spending="pocock")
        status = client.wait(accepted["id"], poll=0.5, timeout=WAIT)
        assert status["state"] == "done", (status, worker.output()[-4000:])
        report = client.report(accepted["id"])
    assert_same_verdict(report, library)
    opts = report["manifest"]["options"]
    assert (opts["sequential"], opts["looks"], opts["spending"], opts["features"]) == (True, 2, "pocock", "verdict")
    seq = report["sequential"]
    assert seq is not None and 1 <= len(seq["looks"]) <= 2
    assert len(seq["looks"]) == len(library.sequential.looks)
    # The features were extracted by need: the six the verdict reads, no gradient pass.
    assert report["feature_layout"]["computed"] == ["dl", "pia", "ml_t000", "ml_t100", "ml_t200", "ml_t300"]
    assert report["manifest"]["passes"]["backward"] == 0


def test_end_to_end(pg_env: dict[str, str], start_api: Callable[[dict[str, str]], str],
                    start_worker: Callable[..., Proc], dataset: dict[str, Any], reference: Any,
                    zoo_model: Any, migrated: str, callbacks: Callbacks, s3_server: S3Server,
                    tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    env = {**pg_env, **s3_server.env(bucket, prefix="cdi/blobs")}
    api_host, worker_host = tmp_path / "api-host", tmp_path / "worker-host"
    tenant = make_tenant(migrated, "e2e")
    base = start_api(_host_env(env, api_host))
    worker = start_worker(_host_env(env, worker_host))
    uploaded: set[str] = set()
    with CdiClient(base, tenant.key) as client:
        assert zoo_model.name in [m["id"] for m in client.models()]
        accepted = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED,
                                 callback_url=callbacks.url)
        states = []

        def seen(s: dict[str, Any]) -> None:
            states.append(s["state"])
            uploaded.update(s3_server.keys(bucket))

        seen(client.status(accepted["id"]))
        status = client.wait(accepted["id"], poll=0.5, timeout=WAIT, on_status=seen)
        assert status["state"] == "done", (status, worker.output()[-4000:])
        assert set(states) <= {"queued", "validating", "extracting", "scoring", "reporting", "done"}
        assert status["progress"]["total"] >= 1 and status["finished_at"]
        report = client.report(accepted["id"])
        assert_same_verdict(report, reference)
        assert report["service"]["audit_id"] == accepted["id"]
        assert status["verdict"] == report["verdict"]
        pdf = client.report_pdf(accepted["id"])
        check_pdf(pdf)
        # The images went to the bucket, and only there; the audit's end deleted them (no
        # retain_images); the PDF the worker wrote is the object the API streamed.
        shas = {hashlib.sha256(p.read_bytes()).hexdigest() for p in dataset["published"] + dataset["unpublished"]}
        assert {f"cdi/blobs/{s[:2]}/{s[2:4]}/{s}" for s in shas} <= uploaded
        pdf_sha = hashlib.sha256(pdf).hexdigest()
        pdf_key = f"cdi/blobs/{pdf_sha[:2]}/{pdf_sha[2:4]}/{pdf_sha}"
        deadline = time.monotonic() + 30  # the worker lets go of the images right after "done"
        while (left := s3_server.keys(bucket)) != [pdf_key] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [pdf_key]
        assert not _files(api_host / "blobs") and not _files(worker_host / "blobs")
        assert not _files(api_host / "spool") and not _files(worker_host / "spool")
    assert callbacks.event.wait(30), "the callback URL was not called"
    assert callbacks.received[-1]["id"] == accepted["id"] and callbacks.received[-1]["state"] == "done"
    with CdiClient(base, tenant.key) as client:
        assert client.cancel(accepted["id"])["removed"]["pdf"] == 1
    assert s3_server.keys(bucket) == []


def _features(url: str) -> int:
    with session_scope(url) as s:
        return int(s.execute(text("SELECT count(*) FROM features")).scalar_one())


def test_sigkill_resumes_without_recomputing(pg_env: dict[str, str], start_api: Callable[[dict[str, str]], str],
                                            start_worker: Callable[..., Proc], dataset: dict[str, Any],
                                            reference: Any, zoo_model: Any, migrated: str) -> None:
    with session_scope(migrated) as s:  # a cold feature cache: this audit must compute
        s.execute(text("DELETE FROM features"))
    tenant = make_tenant(migrated, "sigkill")
    base = start_api(pg_env)
    first = start_worker(pg_env, "doomed", CDI_WORKER_BATCH_SIZE="2")
    total = N_PUBLISHED + N_UNPUBLISHED
    with CdiClient(base, tenant.key) as client:
        audit_id = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED)["id"]
        deadline = time.monotonic() + WAIT
        while _features(migrated) < 4:  # two batches stored, the extraction under way
            assert time.monotonic() < deadline, first.output()[-4000:]
            assert client.status(audit_id)["state"] != "done", "finished before it could be killed"
            time.sleep(0.05)
        first.kill()  # SIGKILL to the worker and its pool process
        stored = _features(migrated)
        assert 4 <= stored < total, stored
        assert client.status(audit_id)["state"] in ("validating", "extracting")

        second = start_worker(pg_env, "rescuer")
        status = client.wait(audit_id, poll=0.5, timeout=WAIT)
        assert status["state"] == "done", (status, second.output()[-4000:])
        assert_same_verdict(client.report(audit_id), reference)
    with session_scope(migrated) as s:
        runs = s.execute(text(
            "SELECT attempt, outcome, features_computed, features_reused, forward_passes FROM audit_runs "
            "WHERE audit_id = :a ORDER BY attempt"), {"a": uuid.UUID(audit_id)}).all()
    assert runs[0].outcome == "crashed"  # the killed attempt never finished; the next one says so
    last = runs[-1]
    assert last.outcome == "done"
    # The features stored before the kill were read back, not computed again...
    assert last.features_reused >= stored
    assert last.features_computed + last.features_reused == total
    # ... and the pass count shows it: fewer forward passes than a whole audit needs.
    full = int(reference.forward_passes)
    assert 0 < last.forward_passes < full
    assert last.forward_passes <= full * (total - stored) / total * 1.05 + 1


# --- embedded mode --------------------------------------------------------------------------


def test_embedded_mode(tmp_path: Path, dataset: dict[str, Any], reference: Any, zoo_model: Any) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDI_")}
    env["CDI_DATA_DIR"] = str(tmp_path / "data")
    env["CDI_WORKER_DEVICE"] = "cpu"
    proc = spawn([sys.executable, "-m", "cdi.cli", "serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", proc, timeout=120)
        key = (tmp_path / "data" / "api-key").read_text().strip()
        assert (tmp_path / "data" / "cdi.db").is_file()
        with CdiClient(base, key) as client:
            accepted = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED)
            status = client.wait(accepted["id"], poll=0.5, timeout=WAIT)
            assert status["state"] == "done", (status, proc.output()[-4000:])
            assert_same_verdict(client.report(accepted["id"]), reference)
            check_pdf(client.report_pdf(accepted["id"]))
    finally:
        proc.stop()
    assert proc.popen.returncode is not None


# --- a LoRA fine-tune, calibrated against its base -------------------------------------------


def test_reference_calibrated_audit_matches_the_library(pg_env: dict[str, str],
                                                        start_api: Callable[[dict[str, str]], str],
                                                        start_worker: Callable[..., Proc], migrated: str,
                                                        tmp_path: Path) -> None:
    """`cdi audit --model BASE --lora L --reference-model BASE` and the API (model = the
    shipped LoRA model, reference_model = its base) give the same verdict and p-value."""
    from cdi import zoo
    from cdi.audit import AuditOptions, audit
    from cdi.images import ImageFile
    from cdi.zoo import digits

    lora = zoo.get_lora("digits-hard-lora")
    size = int(lora.manifest["image_size"])
    archive = tmp_path / "lora.zip"
    files: dict[str, list[ImageFile]] = {"published": [], "unpublished": []}
    with zipfile.ZipFile(archive, "w") as zf:
        sets = (("published", lora.members[:N_PUBLISHED]), ("unpublished", lora.held_out[:N_UNPUBLISHED]))
        for role, indices in sets:
            for i in indices:
                path = tmp_path / f"digit-{i:04d}.png"
                digits.image(i, size).save(path, format="PNG")
                zf.write(path, f"{role}/{path.name}")
                files[role].append(ImageFile.read(path))
    library = audit(files["published"], files["unpublished"], lora.base, lora=str(lora.lora_path),
                    reference_model=lora.base, options=AuditOptions(seed=SEED))
    assert library.calibrated
    tenant = make_tenant(migrated, "lora")
    base = start_api(pg_env)
    worker = start_worker(pg_env)
    with CdiClient(base, tenant.key) as client:
        accepted = client.submit(model=lora.name, reference_model=lora.base, archive=archive, seed=SEED)
        status = client.wait(accepted["id"], poll=0.5, timeout=WAIT)
        assert status["state"] == "done", (status, worker.output()[-4000:])
        report = client.report(accepted["id"])
    assert_same_verdict(report, library)
    assert report["manifest"]["model"]["details"]["calibration"]["mode"] == "reference-calibrated"
    # Both models, and the LoRA's files, are named without a path of the worker's host.
    text = json.dumps(report)
    for path in (str(lora.path.parent), str(zoo.get(lora.base).path.parent), "site-packages", str(tmp_path)):
        assert path not in text, path
    assert report["manifest"]["model"]["source"] == lora.name
