"""Benchmark: one sharded audit on one worker process, then on two, on this machine.

Needs the service's Postgres and Redis (``scripts/services``). Makes a database of its own
(dropped at the end), exports a shipped model's member and held-out images, stores one audit
of them, and for 1 and then 2 Celery worker processes (each ``--concurrency=1``, started and
ready before the clock starts, the feature cache emptied before each run) times the audit
from the moment its task is sent until it is done.

    OMP_NUM_THREADS=1 python bench/shards.py [--model digits-flip] [--published 10]
        [--unpublished 20] [--shard-size 4] [--batch-size 8]

Prints each run's wall-clock time, the time its shards spent extracting (summed over
shards), the final step's time, and the ratio 1 worker / 2 workers. Both runs must give the
same verdict and p-value, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("CDI_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CDI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-flip")
    ap.add_argument("--published", type=int, default=10)
    ap.add_argument("--unpublished", type=int, default=20)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)

    import psycopg
    import redis
    from sqlalchemy import text

    from app.queue import CeleryQueue, make_celery
    from app.settings import Settings
    from app.storage import migrate
    from app.storage.blobs import open_blob_store
    from app.storage.db import engine_for, session_scope
    from app.storage.repositories import AuditRepository, TenantRepository
    from cdi import zoo

    tmp = Path(tempfile.mkdtemp(prefix="cdi-bench-shards-"))
    name = f"cdi_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    tag = uuid.uuid4().hex[:8]
    env = {
        "CDI_DATABASE_URL": url, "CDI_BROKER_URL": REDIS, "CDI_BLOB_DIR": str(tmp / "blobs"),
        "CDI_AUDIT_QUEUE": f"cdi-bench-audits-{tag}", "CDI_CALLBACK_QUEUE": f"cdi-bench-callbacks-{tag}",
        "CDI_WORKER_DEVICE": "cpu", "CDI_SHARD_SIZE": str(args.shard_size),
        "CDI_WORKER_BATCH_SIZE": str(args.batch_size), "CDI_LEASE_SECONDS": "30",
        "CDI_ENVIRONMENT": "test",
    }
    settings = Settings(**{k.removeprefix("CDI_").lower(): v for k, v in env.items()})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        migrate.upgrade(url)
        model = zoo.get(args.model)
        published, unpublished = model.export(tmp / "images", members=args.published, held_out=args.unpublished)
        blobs = open_blob_store(settings)
        rows = []
        for role, paths in (("published", published), ("unpublished", unpublished)):
            for p in paths:
                data = p.read_bytes()
                rows.append((role, p.name, blobs.put_bytes(data), len(data), None, None))
        with session_scope(url) as s:
            tenant = TenantRepository(s).create(f"bench-{tag}")
            tenant_id = tenant.id
        queue = CeleryQueue(make_celery(settings), settings.audit_queue, settings.callback_queue)

        results = {}
        for n_workers in (1, 2):
            with session_scope(url) as s:
                s.execute(text("DELETE FROM features"))
                s.execute(text("DELETE FROM worker_heartbeats"))
                audit_id = AuditRepository(s).create(
                    tenant_id=tenant_id, model_id=model.name, model_source=model.name, model_revision=None,
                    options={"alpha": 0.01, "protocol": "directional", "features": "all", "seed": args.seed},
                    callback_url=None, images=rows, retain_images=True).id
            for i in range(n_workers):
                data_dir = tmp / f"worker-{n_workers}-{i}"
                data_dir.mkdir()
                log = (tmp / f"worker-{n_workers}-{i}.log").open("ab")
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker", "--loglevel=WARNING",
                     f"--hostname=bench{i}-{tag}@%h", f"--queues={settings.audit_queue}", "--concurrency=1",
                     "--pool=prefork", "--without-gossip", "--without-mingle"],
                    cwd=ROOT, env={**os.environ, **env, "CDI_DATA_DIR": str(data_dir)}, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))

            def ready(n: int = n_workers) -> bool:
                with session_scope(url) as s:
                    return int(s.execute(text("SELECT count(*) FROM worker_heartbeats")).scalar_one()) >= n

            _wait(ready, 120, f"{n_workers} worker(s)")
            start = time.perf_counter()
            queue.enqueue(audit_id)

            def finished(a: uuid.UUID = audit_id) -> bool:
                with session_scope(url) as s:
                    audit = AuditRepository(s).get(a)
                    assert audit is not None
                    if audit.state in ("failed", "cancelled"):
                        raise SystemExit(f"the audit ended {audit.state}: {audit.error_message}")
                    return audit.state == "done"

            _wait(finished, 1800, "the audit")
            wall = time.perf_counter() - start
            with session_scope(url) as s:
                audit = AuditRepository(s).get(audit_id)
                assert audit is not None
                runs = AuditRepository(s).runs(audit_id)
                shard_seconds = sum((r.finished_at - r.started_at).total_seconds()
                                    for r in runs if r.shard is not None and r.finished_at)
                final = [r for r in runs if r.shard is None and r.outcome == "done"]
                final_seconds = sum((r.finished_at - r.started_at).total_seconds() for r in final if r.finished_at)
                workers = sorted({r.worker.rsplit(":", 1)[0] for r in runs if r.shard is not None})
                results[n_workers] = (wall, audit.verdict, audit.p_value)
                timings = ((audit.report or {}).get("manifest") or {}).get("timings_seconds") or {}
            print(f"{n_workers} worker(s): {wall:7.1f} s wall, shards {shard_seconds:7.1f} s summed over "
                  f"{sum(1 for r in runs if r.shard is not None)} shard runs on {len(workers)} worker(s), "
                  f"final step {final_seconds:5.1f} s; verdict {audit.verdict}, p = {audit.p_value:.6g}")
            print("   final step's library stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                  + f"; the rest (reading images, report, PDF, database) {final_seconds - sum(timings.values()):.1f} s")
            for p in procs:
                os.killpg(p.pid, 15)
                p.wait(timeout=60)
            procs.clear()
        (w1, v1, p1), (w2, v2, p2) = results[1], results[2]
        if (v1, p1) != (v2, p2):
            raise SystemExit(f"the runs disagree: {v1} p={p1} against {v2} p={p2}")
        print(f"ratio 1 worker / 2 workers: {w1 / w2:.2f}x  (cores on this machine: {os.cpu_count()})")
        return 0
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 9)
        redis.Redis.from_url(REDIS).delete(settings.audit_queue, settings.callback_queue)
        engine_for.cache_clear()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    raise SystemExit(main())
