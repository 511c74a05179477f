"""Benchmark: what a status poll and a list page cost when the report is (not) loaded.

An audit of ``--images`` images (default 2,000) is stored with its real sealed report (the
library's test, controls and verdict on synthetic features: tests/unit/test_report.py's
``synthetic_result``), plus ``--list`` more finished audits with the same report for a list page.
Then ``GET /v1/audits/{id}`` and ``GET /v1/audits?limit=N`` are called through the real API
(FastAPI's test client, the real database) in two ways, alternating in the same process:

* **deferred**: the service as it is (the report column is deferred, app/storage/models.py);
* **undeferred**: every ORM query on audits made to load the report too (a ``do_orm_execute``
  hook adding ``undefer(Audit.report)``): what the routes cost before.

Prints the median time of each call, the ratio undeferred/deferred, and the bytes the
database sent for the call's statements (the statements are recorded and run again on a raw
connection; bytes are the lengths of the values as text).

    OMP_NUM_THREADS=1 python bench/status_reads.py                  # SQLite in a temporary folder
    OMP_NUM_THREADS=1 python bench/status_reads.py --pg-admin postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def synthetic_report(n_images: int) -> dict[str, Any]:
    """A real sealed ``cdi-report/1`` document of an audit of ``n_images`` images."""
    from cdi.report import build_report, report_json, seal

    spec = importlib.util.spec_from_file_location("_report_fixtures", ROOT / "tests" / "unit" / "test_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.synthetic_result("used", seed=0, n_p=n_images // 2, n_u=n_images - n_images // 2)
    return json.loads(report_json(seal(build_report(result))))  # type: ignore[no-any-return]


@contextmanager
def database(pg_admin: str | None) -> Iterator[str]:
    if pg_admin is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    import psycopg

    name = f"cdi_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(pg_admin, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}/{name}"
    finally:
        from app.storage.db import engine_for

        engine_for.cache_clear()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def populate(url: str, report: dict[str, Any], n_images: int, n_list: int) -> tuple[uuid.UUID, str]:
    """The audits; returns (the audit with ``n_images`` image rows, an API key of its tenant)."""
    from app.storage.db import session_scope
    from app.storage.models import utcnow
    from app.storage.repositories import ApiKeyRepository, AuditRepository, TenantRepository

    with session_scope(url) as s:
        tenant = TenantRepository(s).create(f"bench-{uuid.uuid4().hex[:6]}")
        key = ApiKeyRepository(s).create(tenant).plaintext
        repo = AuditRepository(s)
        first = None
        for k in range(1 + n_list):
            images = [("published" if i < n_images // 2 else "unpublished", f"img-{i:05d}.png",
                       f"{(k * 100_000 + i):064x}", 12_345, None, None) for i in range(n_images if k == 0 else 0)]
            audit = repo.create(tenant_id=tenant.id, images=images, model_id="bench-model", model_source="/m",
                                model_revision=None, options={"alpha": 0.01, "seed": 0}, callback_url=None,
                                retain_images=False)
            audit.state, audit.report = "done", report
            audit.verdict, audit.p_value = report.get("verdict"), report.get("p_value")
            audit.n_published, audit.n_unpublished = n_images // 2, n_images - n_images // 2
            audit.finished_at = utcnow()
            first = first or audit.id
        assert first is not None
        return first, key


@contextmanager
def undeferred() -> Iterator[None]:
    """Every ORM SELECT of audits loads the report as well (what the routes did before)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session, undefer

    from app.storage.models import Audit

    def hook(state: Any) -> None:
        # Only queries of whole Audit rows (not of other rows, nor of some of Audit's columns).
        if state.is_select and any(d.get("type") is Audit and d.get("expr") is Audit
                                   for d in state.statement.column_descriptions):
            state.statement = state.statement.options(undefer(Audit.report))

    event.listen(Session, "do_orm_execute", hook)
    try:
        yield
    finally:
        event.remove(Session, "do_orm_execute", hook)


@contextmanager
def recorded(url: str) -> Iterator[list[tuple[str, Any]]]:
    from sqlalchemy import event

    from app.storage.db import engine_for

    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        seen.append((statement, parameters))

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def fetched_bytes(url: str, statements: list[tuple[str, Any]]) -> int:
    """The bytes of the values the SELECTs among ``statements`` return (as text)."""
    from app.storage.db import engine_for

    total = 0
    with engine_for(url).connect() as conn:
        for statement, params in statements:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            for row in conn.exec_driver_sql(statement, params):
                for v in row:
                    if v is None:
                        continue
                    total += len(v) if isinstance(v, (bytes, str)) else len(json.dumps(v, default=str))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--list", type=int, default=20, help="finished audits on the list page")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pg-admin", default=None,
                        help="a Postgres URL to create a temporary database with (default: SQLite)")
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from app.storage import migrate

    t0 = time.perf_counter()
    report = synthetic_report(args.images)
    size = len(json.dumps(report))
    print(f"report of {args.images} images: {size / 1024:.0f} KiB of JSON (built in {time.perf_counter() - t0:.1f} s)")

    class _Queue:
        def ping(self) -> None:
            pass

    with database(args.pg_admin) as url, tempfile.TemporaryDirectory() as data:
        migrate.upgrade(url)
        audit_id, key = populate(url, report, args.images, args.list)
        settings = Settings(database_url=url, data_dir=data, rate_limit_per_minute=0, register_zoo_models=False)
        app = create_app(settings, queue=_Queue())  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {key}"}
        calls = {"status": f"/v1/audits/{audit_id}", f"list page ({args.list + 1} audits)":
                 f"/v1/audits?limit={args.list + 1}"}
        print(f"database: {url.split(':', 1)[0]}; {args.repeats} calls each, alternating; medians")
        print(f"{'call':<24}{'undeferred':>12}{'deferred':>12}{'ratio':>8}{'bytes undeferred':>18}"
              f"{'bytes deferred':>16}")
        with TestClient(app) as client:
            for name, path in calls.items():
                times: dict[bool, list[float]] = {True: [], False: []}
                sizes: dict[bool, int] = {}
                for mode in (True, False):  # warm up, and count the bytes once
                    with (undeferred() if mode else _nothing()), recorded(url) as seen:
                        assert client.get(path, headers=headers).status_code == 200
                    sizes[mode] = fetched_bytes(url, seen)
                for _ in range(args.repeats):
                    for mode in (True, False):
                        with undeferred() if mode else _nothing():
                            start = time.perf_counter()
                            r = client.get(path, headers=headers)
                            times[mode].append(time.perf_counter() - start)
                        assert r.status_code == 200
                before, after = statistics.median(times[True]), statistics.median(times[False])
                print(f"{name:<24}{before * 1000:>10.2f}ms{after * 1000:>10.2f}ms{before / after:>7.1f}x"
                      f"{sizes[True]:>18,}{sizes[False]:>16,}")
    sys.stdout.flush()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()
