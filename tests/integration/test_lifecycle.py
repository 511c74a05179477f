"""Process lifecycle: ``cdi serve`` and its worker, readiness, admin commands on a fresh folder.

``cdi serve`` is signalled alone (not its process group): its worker must go with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import PG_ADMIN, ROOT, free_port, spawn, wait_http

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _serve(tmp_path: Path) -> tuple[object, str, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDI_")}
    env.update({"CDI_DATA_DIR": str(tmp_path / "data"), "CDI_WORKER_DEVICE": "cpu",
                "CDI_WORKER_HEARTBEAT_SECONDS": "1", "CDI_WORKER_POOL": "solo"})
    proc = spawn([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz", proc, timeout=120)  # ready means: a worker's heartbeat was seen
    workers = _children(proc.popen.pid)  # type: ignore[attr-defined]
    assert workers, "cdi serve started no worker"
    return proc, base, workers[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_serve_stops_its_worker_when_signalled_alone(tmp_path: Path, sig: int) -> None:
    proc, base, worker = _serve(tmp_path)
    try:
        if sig == signal.SIGTERM:
            # A worker that dies makes the service unready (its heartbeats stop).
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                assert time.monotonic() < deadline, "readyz stayed 200 without a live worker"
                time.sleep(0.5)
            body = httpx.get(f"{base}/readyz", timeout=5).json()
            assert body["checks"]["workers"].startswith("unavailable")
        os.kill(proc.popen.pid, sig)  # type: ignore[attr-defined]
        proc.popen.wait(timeout=60)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while _alive(worker):
            assert time.monotonic() < deadline, f"the worker {worker} outlived cdi serve"
            time.sleep(0.2)
    finally:
        proc.kill()  # type: ignore[attr-defined]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CDI_")} | env
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


def test_admin_commands_in_a_fresh_folder_create_the_embedded_database(tmp_path: Path) -> None:
    env = {"CDI_DATA_DIR": str(tmp_path / "fresh")}
    r = _cli(["admin", "register-model", "m", str(tmp_path / "no-such-model")], env)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and "error:" in r.stderr
    assert (tmp_path / "fresh" / "cdi.db").is_file()
    r = _cli(["admin", "create-tenant", "acme"], env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_admin_commands_on_an_unmigrated_server_database_say_what_to_run(tmp_path: Path) -> None:
    import psycopg

    name = f"cdi_test_fresh_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        env = {"CDI_DATABASE_URL": f"{base}/{name}", "CDI_DATA_DIR": str(tmp_path)}
        for args in (["create-tenant", "acme"], ["audits", "--stuck"], ["reconcile"]):
            r = _cli(["admin", *args], env)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert "cdi admin migrate" in r.stderr
        r = _cli(["admin", "create-tenant", "x"], {**env, "CDI_DATABASE_URL": f"{base.rsplit(':', 1)[0]}:"
                                                     f"{free_port()}/{name}"})
        assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot reach the database" in r.stderr
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
