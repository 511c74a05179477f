"""Integration fixtures: a fresh Postgres database per test session, Redis, real processes.

* ``pg_url``: a database ``cdi_test_<random>`` created on the local Postgres (127.0.0.1:5432,
  user postgres) for this session and dropped at its end.
* ``redis_url`` and unique queue names: tests share the Redis server, never a queue.
* ``service``: settings, a migrated database, tenants with keys, and an in-process API client.
* ``start_worker`` / ``start_api``: a real Celery worker / uvicorn in a subprocess (own
  process group, so a test can SIGKILL the worker with its pool).
* ``s3_server``: a real S3 server (moto's server mode) on 127.0.0.1 for the session;
  ``s3_env`` gives a fresh bucket and the settings (``CDI_BLOB_URL``...) that select it;
  ``s3_service`` is ``service`` with its blobs in that object store.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("CDI_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CDI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

pytestmark = pytest.mark.integration


def _pg_connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this test session (dropped afterwards)."""
    try:
        admin = _pg_connect(PG_ADMIN)
    except Exception as exc:  # pragma: no cover - the environment lacks Postgres
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN} (scripts/services starts it): {exc}")
    name = f"cdi_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        from app.storage.db import engine_for

        engine_for.cache_clear()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=3).ping()
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"Redis is not reachable at {REDIS} (scripts/services starts it): {exc}")
    return REDIS


@pytest.fixture(scope="session")
def migrated(pg_url: str) -> str:
    from app.storage import migrate

    migrate.upgrade(pg_url)
    return pg_url


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1: the real HTTP protocol, boto3's real client."""

    endpoint: str

    def client(self) -> object:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"cdi-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def env(self, bucket: str, prefix: str = "blobs") -> dict[str, str]:
        """The settings of a process whose blobs are in ``bucket``."""
        return {"CDI_BLOB_URL": f"s3://{bucket}/{prefix}", "CDI_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)  # type: ignore[attr-defined]
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``moto_server`` in its own process (its memory and its GIL are not the tests')."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    proc = spawn([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)], {}, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, timeout=60)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        proc.kill(signal.SIGTERM)


@pytest.fixture
def s3_env(s3_server: S3Server) -> dict[str, str]:
    """A fresh bucket's settings (CDI_BLOB_URL, the endpoint, credentials)."""
    return s3_server.env(s3_server.new_bucket())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    img = Image.new("L", (size, size), color=seed % 256)
    for i, byte in enumerate(seed.to_bytes(8, "little")):  # distinct for every seed
        img.putpixel((i, 0), byte)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def synthetic_archive(n_p: int = 10, n_u: int = 20, offset: int = 0) -> bytes:
    members = {f"published/p{i:03d}.png": png(offset + i) for i in range(n_p)}
    members.update({f"unpublished/u{i:03d}.png": png(offset + 100 + i) for i in range(n_u)})
    return zip_bytes(members)


@dataclass
class Tenant:
    name: str
    key: str
    id: uuid.UUID


@dataclass
class Service:
    settings: object
    env: dict[str, str]
    client: object  # fastapi.testclient.TestClient
    alice: Tenant
    bob: Tenant
    admin: Tenant

    def headers(self, tenant: Tenant) -> dict[str, str]:
        return {"Authorization": f"Bearer {tenant.key}"}

    def queued(self) -> int:
        """Messages waiting in this session's audit queue (Redis list)."""
        import redis

        r = redis.Redis.from_url(self.env["CDI_BROKER_URL"])
        return int(r.llen(self.env["CDI_AUDIT_QUEUE"]))  # type: ignore[arg-type]

    def purge(self) -> None:
        import redis

        r = redis.Redis.from_url(self.env["CDI_BROKER_URL"])
        r.delete(self.env["CDI_AUDIT_QUEUE"], self.env["CDI_CALLBACK_QUEUE"])


def service_env(pg: str, redis_url: str, blob_dir: Path, **extra: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    env = {
        "CDI_ENVIRONMENT": "test",
        "CDI_DATABASE_URL": pg,
        "CDI_BROKER_URL": redis_url,
        "CDI_BLOB_DIR": str(blob_dir),
        "CDI_DATA_DIR": str(blob_dir.parent),
        "CDI_AUDIT_QUEUE": f"cdi-test-audits-{tag}",
        "CDI_CALLBACK_QUEUE": f"cdi-test-callbacks-{tag}",
        "CDI_LEASE_SECONDS": "4",
        "CDI_BROKER_VISIBILITY_TIMEOUT": "8",
        "CDI_WORKER_DEVICE": "cpu",
        "CDI_CALLBACK_BACKOFF": "0.5",
        # Readiness waits for a worker's heartbeat; the tests start the API before the workers.
        "CDI_READY_REQUIRES_WORKER": "false",
        # Callbacks go to a receiver on 127.0.0.1 in the tests.
        "CDI_CALLBACK_ALLOW": "127.0.0.1",
        "CDI_RECONCILE_INTERVAL": "2",
        # Quotas are tested on their own (test_hardening.py); the other tests submit freely.
        "CDI_MAX_CONCURRENT_AUDITS": "0",
        "CDI_MAX_AUDITS_PER_DAY": "0",
        "CDI_RATE_LIMIT_PER_MINUTE": "0",
        "CDI_ADDRESS_RATE_LIMIT_PER_MINUTE": "0",
        "CDI_MAX_CONCURRENT_UPLOADS": "0",
    }
    env.update(extra)
    return env


def make_tenant(pg: str, name: str, admin: bool = False) -> Tenant:
    from app.storage.db import session_scope
    from app.storage.repositories import ApiKeyRepository, TenantRepository

    with session_scope(pg) as session:
        tenant = TenantRepository(session).create(f"{name}-{uuid.uuid4().hex[:6]}", is_admin=admin)
        key = ApiKeyRepository(session).create(tenant).plaintext
        return Tenant(tenant.name, key, tenant.id)


@pytest.fixture(scope="session")
def service(migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(migrated, service_env(migrated, redis_url, tmp_path_factory.mktemp("service") / "blobs"))


@pytest.fixture(scope="session")
def s3_service(migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
               s3_server: S3Server) -> Iterator[Service]:
    """``service`` with its blobs in a bucket of the S3 server."""
    env = service_env(migrated, redis_url, tmp_path_factory.mktemp("s3-service") / "blobs",
                      **s3_server.env(s3_server.new_bucket()))
    yield from _service(migrated, env)


def _service(migrated: str, env: dict[str, str]) -> Iterator[Service]:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(**{k.removeprefix("CDI_").lower(): v for k, v in env.items()})
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        svc = Service(settings, env, client, make_tenant(migrated, "alice"), make_tenant(migrated, "bob"),
                      make_tenant(migrated, "admin", admin=True))
        try:
            yield svc
        finally:
            svc.purge()


# --- real processes -------------------------------------------------------------------------


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker and its pool processes)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(argv: list[str], env: dict[str, str], log: Path) -> Proc:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    return Proc(popen, log)


@pytest.fixture
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture
def start_worker(processes: list[Proc], tmp_path: Path) -> Callable[..., Proc]:
    def start(env: dict[str, str], name: str = "w1", **extra: str) -> Proc:
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker",
                "--loglevel=INFO", f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h",
                f"--queues={env['CDI_AUDIT_QUEUE']},{env['CDI_CALLBACK_QUEUE']}",
                "--concurrency=1", "--pool=prefork", "--without-gossip", "--without-mingle"]
        proc = spawn(argv, {**env, **extra}, tmp_path / f"worker-{name}.log")
        processes.append(proc)
        return proc

    return start


def wait_http(url: str, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the process exited ({proc.popen.returncode}):\n{proc.output()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{proc.output()[-4000:]}")


@pytest.fixture
def start_api(processes: list[Proc], tmp_path: Path) -> Callable[[dict[str, str]], str]:
    def start(env: dict[str, str]) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]
        proc = spawn(argv, env, tmp_path / "api.log")
        processes.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", proc)
        return base

    return start
