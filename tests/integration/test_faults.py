"""Fault injection on real Redis and Postgres processes that the tests start themselves.

* Redis is killed and its data removed while 3 audits are queued: after the reconciler runs
  (``cdi admin reconcile``), all 3 finish.
* Postgres is stopped for 15 s while a worker extracts features: requests meanwhile answer
  503 ``database_unavailable`` with ``Retry-After``, and the audit finishes once it is back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text, update

from app.client import CdiClient
from app.storage.db import session_scope

from .conftest import ROOT, Proc, free_port, make_tenant, service_env, spawn
from .test_end_to_end import SEED, dataset, zoo_model  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT = 300.0


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


# --- an own Redis ---------------------------------------------------------------------------


def _start_redis(port: int, data: Path, log: Path) -> Proc:
    data.mkdir(parents=True, exist_ok=True)
    proc = spawn([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                  "--dir", str(data), "--appendonly", "yes", "--save", ""], {}, log)
    import redis

    def up() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    _wait(up, 30, "redis-server")
    return proc


def test_redis_loses_its_data_with_three_audits_queued(
        migrated: str, tmp_path: Path, dataset: dict[str, Any], zoo_model: Any,  # noqa: F811
        start_worker: Callable[..., Proc], processes: list[Proc]) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from app.storage.models import Audit, utcnow

    port = free_port()
    redis_proc = _start_redis(port, tmp_path / "redis", tmp_path / "redis.log")
    processes.append(redis_proc)
    env = service_env(migrated, f"redis://127.0.0.1:{port}/0", tmp_path / "blobs")
    settings = Settings(**{k.removeprefix("CDI_").lower(): v for k, v in env.items()})
    tenant = make_tenant(migrated, "faults")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    with TestClient(create_app(settings)) as client:
        ids = []
        for _ in range(3):  # the same images: the feature cache makes the second and third cheap
            with dataset["archive"].open("rb") as f:
                r = client.post("/v1/audits", headers=headers, files={"archive": ("a.zip", f, "application/zip")},
                                data={"model": zoo_model.name, "seed": str(SEED), "features": "gradient-free"})
            assert r.status_code == 202, r.text
            ids.append(uuid.UUID(r.json()["id"]))
        # Redis dies and comes back empty (no append-only file): the 3 messages are gone.
        redis_proc.kill(signal.SIGKILL)
        shutil.rmtree(tmp_path / "redis")
        processes.append(_start_redis(port, tmp_path / "redis", tmp_path / "redis2.log"))
        with session_scope(migrated) as s:  # they were sent a minute ago
            s.execute(update(Audit).where(Audit.id.in_(ids)).values(enqueued_at=utcnow() - timedelta(minutes=1)))
        start_worker(env, "after-the-loss")
        time.sleep(3)
        assert all(client.get(f"/v1/audits/{i}", headers=headers).json()["state"] == "queued" for i in ids)
        out = subprocess.run([sys.executable, "-m", "app.cli", "admin", "audits", "--stuck"], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and all(str(i) in out.stdout for i in ids), out.stderr
        out = subprocess.run([sys.executable, "-m", "app.cli", "admin", "reconcile"], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert {uuid.UUID(line) for line in out.stdout.split()} >= set(ids)

        def all_done() -> bool:
            states = [client.get(f"/v1/audits/{i}", headers=headers).json()["state"] for i in ids]
            assert "failed" not in states, states
            return all(s == "done" for s in states)

        _wait(all_done, WAIT, "the 3 audits to finish")


# --- an own Postgres ------------------------------------------------------------------------


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[dict[str, Any]]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    assert initdb and pg_ctl, "initdb and pg_ctl are needed (Postgres' server binaries)"
    # Postgres refuses to run as root: as root, its folder belongs to the postgres user, outside
    # pytest's private temporary folder.
    user = [] if os.geteuid() != 0 else ["-u", "postgres"]
    root = Path(tempfile.mkdtemp(prefix="cdi-faults-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if user:
        for p in (root, sock):
            shutil.chown(p, "postgres")
    port = free_port()

    def run(*argv: str) -> None:
        cmd = ["runuser", *user, "--", *argv] if user else list(argv)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = {"start": lambda: run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "pg.log"), "-w", "start"),
           "stop": lambda: run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")}
    ctl["start"]()
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE cdi")
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/cdi"
    from app.storage import migrate

    migrate.upgrade(url)
    try:
        yield {"url": url, **ctl}
    finally:
        subprocess.run(["runuser", *user, "--", pg_ctl, "-D", str(data), "-m", "immediate", "stop"] if user else
                       [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        from app.storage.db import engine_for

        engine_for.cache_clear()
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_stops_for_15_s_during_extraction(
        own_postgres: dict[str, Any], redis_url: str, tmp_path: Path, dataset: dict[str, Any],  # noqa: F811
        zoo_model: Any, start_api: Callable[[dict[str, str]], str],  # noqa: F811
        start_worker: Callable[..., Proc]) -> None:
    url = own_postgres["url"]
    env = service_env(url, redis_url, tmp_path / "blobs", CDI_WORKER_BATCH_SIZE="2")
    tenant = make_tenant(url, "outage")
    base = start_api(env)
    start_worker(env, "survivor")

    def features() -> int:
        with session_scope(url) as s:
            return int(s.execute(text("SELECT count(*) FROM features")).scalar_one())

    with CdiClient(base, tenant.key) as client:
        audit_id = client.submit(model=zoo_model.name, archive=dataset["archive"], seed=SEED + 1)["id"]
        _wait(lambda: features() >= 2, WAIT, "the extraction to start")
        own_postgres["stop"]()
        stopped = time.monotonic()
        headers = {"Authorization": f"Bearer {tenant.key}"}
        answers = []
        while time.monotonic() - stopped < 15:
            r = httpx.get(f"{base}/v1/audits/{audit_id}", headers=headers, timeout=30)
            answers.append((r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else None,
                            r.headers.get("retry-after")))
            time.sleep(1)
        assert answers and all(a[:2] == (503, "database_unavailable") and a[2] for a in answers), answers[:3]
        own_postgres["start"]()
        status = client.wait(audit_id, poll=1.0, timeout=WAIT)
        assert status["state"] == "done" and status["verdict"], status
