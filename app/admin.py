"""Operator commands beyond tenants and keys: the reconciler, stuck audits, purge, secrets.

``app.cli`` registers them (``cdi admin reconcile``, ``cdi admin audits --stuck``,
``cdi admin purge --older-than 90d``, ``cdi admin webhook-secret``); each function here takes
the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w``."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90d, 12h, 30m, 45s or 2w)")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _err(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def ensure_database(settings: Any) -> str | None:
    """Make sure the service's database exists and is migrated before a command uses it.

    The embedded SQLite database is created and migrated when it is missing or behind (it is
    the operator's own file); a server database is never changed here. Returns an error
    message to print (what to run), or None when the database is ready.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from app.storage import migrate

    if settings.is_sqlite:
        path = settings.database_url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if not settings.blob_url:
            settings.blobs.mkdir(parents=True, exist_ok=True)
        try:
            if migrate.current(settings.database_url) != migrate.head():
                migrate.upgrade(settings.database_url)
                print(f"created or upgraded the embedded database {path}", file=sys.stderr)
        except SQLAlchemyError as exc:
            return f"cannot open the embedded database {path} ({type(exc).__name__}: {exc.args[0]})"
        return None
    try:
        current = migrate.current(settings.database_url)
    except SQLAlchemyError as exc:
        return (f"cannot reach the database in CDI_DATABASE_URL ({type(exc).__name__}); is it running, and "
                "are the address and credentials right?")
    if current != migrate.head():
        return (f"the database is at revision {current or 'none (empty)'}, this version needs {migrate.head()}: "
                "run `cdi admin migrate`")
    return None


def _queue(settings: Any) -> Any:
    from app.queue import CeleryQueue, make_celery

    return CeleryQueue(make_celery(settings), settings.audit_queue, settings.callback_queue)


def cmd_reconcile(args: argparse.Namespace, settings: Any) -> int:
    from app.reconcile import reconcile
    from app.storage.blobs import open_blob_store
    from app.storage.db import session_factory

    report = reconcile(session_factory(settings.database_url), settings, open_blob_store(settings),
                       _queue(settings))
    for audit_id in report.requeued + report.sent:
        print(audit_id)
    print(", ".join(f"{k}: {v}" for k, v in report.as_dict().items()), file=sys.stderr)
    return 0


def cmd_audits(args: argparse.Namespace, settings: Any) -> int:
    from sqlalchemy import select

    from app.reconcile import find_stuck
    from app.storage.db import session_factory
    from app.storage.models import Audit

    with session_factory(settings.database_url)() as session:
        if args.stuck:
            stuck = find_stuck(session, settings, _queue(settings))
            for s in stuck:
                print(f"{s.audit_id}  {s.state:10s}  since {s.since.isoformat(timespec='seconds')}  {s.reason}")
            print(f"{len(stuck)} stuck audit(s); `cdi admin reconcile` sends them again", file=sys.stderr)
            return 1 if stuck else 0
        q = select(Audit).order_by(Audit.created_at.desc()).limit(args.limit)
        if args.state:
            q = q.where(Audit.state == args.state)
        for a in session.scalars(q):
            print(f"{a.id}  {a.state:10s}  {a.created_at.isoformat(timespec='seconds')}  {a.model_id}")
    return 0


def cmd_runs(args: argparse.Namespace, settings: Any) -> int:
    """An audit's attempts: which worker ran which shard (or the whole audit, or its final
    step), with what outcome, what it computed and reused, and its pass counts."""
    import uuid

    from app.storage.db import session_factory
    from app.storage.repositories import AuditRepository, ShardRepository

    try:
        audit_id = uuid.UUID(args.audit_id)
    except ValueError:
        return _err(f"{args.audit_id!r} is not an audit id")
    with session_factory(settings.database_url)() as session:
        repo = AuditRepository(session)
        if repo.get(audit_id) is None:
            return _err(f"no audit {audit_id}")
        shards = {s.shard: s for s in ShardRepository(session).all(audit_id)}
        print(f"{'attempt':>7}  {'shard':>9}  {'outcome':10s}  {'computed':>8}  {'reused':>6}  {'forward':>8}  "
              f"{'backward':>8}  worker")
        for r in repo.runs(audit_id):
            if r.shard is None:
                what = "-"
            else:
                s = shards.get(r.shard)
                what = f"{r.shard} ({s.first}+{s.count})" if s is not None else str(r.shard)
            print(f"{r.attempt:>7}  {what:>9}  {r.outcome or 'running':10s}  {r.features_computed:>8}  "
                  f"{r.features_reused:>6}  {r.forward_passes:>8}  {r.backward_passes:>8}  {r.worker}")
    return 0


def cmd_purge(args: argparse.Namespace, settings: Any) -> int:
    """Delete every ended audit older than ``--older-than`` the way DELETE does."""
    from sqlalchemy import select

    from app.services import AuditService
    from app.storage.blobs import open_blob_store
    from app.storage.db import session_factory
    from app.storage.models import TERMINAL_STATES, Audit, utcnow

    factory = session_factory(settings.database_url)
    service = AuditService(factory, settings, open_blob_store(settings), _queue(settings))
    cutoff = utcnow() - args.older_than
    with factory() as session:
        ids = list(session.scalars(select(Audit.id).where(
            Audit.created_at < cutoff, Audit.state.in_(TERMINAL_STATES), Audit.deleted_at.is_(None))))
    totals: dict[str, int] = {}
    for audit_id in ids:
        if args.dry_run:
            print(audit_id)
            continue
        with factory() as session:
            audit = session.get(Audit, audit_id)
            if audit is None:
                continue
            _, removed = service.delete(session, audit)
        for k, v in removed.items():
            totals[k] = totals.get(k, 0) + v
        print(audit_id)
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {len(ids)} audit(s) created before {cutoff.isoformat(timespec='seconds')}"
          + (f"; removed {', '.join(f'{k}: {v}' for k, v in sorted(totals.items()))}" if totals else ""),
          file=sys.stderr)
    return 0


def cmd_webhook_secret(args: argparse.Namespace, settings: Any) -> int:
    from app.storage.db import session_scope
    from app.storage.repositories import TenantRepository

    with session_scope(settings.database_url) as session:
        tenants = TenantRepository(session)
        tenant = tenants.by_name(args.tenant)
        if tenant is None:
            return _err(f"no tenant named {args.tenant!r}")
        print(tenants.webhook_secret(tenant.id, rotate=args.rotate))
    return 0


def register(admin: Any, run: Any) -> None:
    """Add the commands to ``cdi admin``'s subparsers; ``run`` wraps each with settings and checks."""
    q = admin.add_parser("reconcile", help="send stuck audits again, collect unused blobs, clean the spool")
    q.set_defaults(func=run(cmd_reconcile))
    q = admin.add_parser("audits", help="list audits (--stuck: those that will not progress by themselves)")
    q.add_argument("--stuck", action="store_true", help="only audits queued or running with no live task")
    q.add_argument("--state", default=None)
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=run(cmd_audits))
    q = admin.add_parser("runs", help="an audit's attempts: worker, shard, outcome, features and passes")
    q.add_argument("audit_id")
    q.set_defaults(func=run(cmd_runs))
    q = admin.add_parser("purge", help="delete ended audits older than a duration (images, reports, runs)")
    q.add_argument("--older-than", type=parse_duration, required=True, metavar="DURATION",
                   help="e.g. 90d, 12h, 2w")
    q.add_argument("--dry-run", action="store_true", help="list what would be purged")
    q.set_defaults(func=run(cmd_purge))
    q = admin.add_parser("webhook-secret", help="print (or --rotate) the secret that signs a tenant's callbacks")
    q.add_argument("tenant", help="the tenant's name")
    q.add_argument("--rotate", action="store_true")
    q.set_defaults(func=run(cmd_webhook_secret))
