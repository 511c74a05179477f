"""The service's ``cdi`` subcommands, registered through the ``cdi.commands`` entry points.

Operator commands: ``cdi serve`` (the embedded service: migrations, API and a local worker),
``cdi worker`` (a Celery worker), ``cdi admin …`` (migrate, tenants, keys, models). Client
commands: ``cdi submit``, ``cdi status``, ``cdi fetch`` (configured by ``CDI_URL`` and
``CDI_API_KEY``, or ``--url`` and ``--api-key``).

Each ``register_*`` function takes the ``cdi`` parser's subparsers and adds one command.
Heavy imports happen inside the commands, so ``cdi --help`` stays fast and works without the
service's extras.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cdi.options import Protocol

DEFAULT_URL = "http://127.0.0.1:8000"


def _err(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# --- operator commands ----------------------------------------------------------------------


def _settings() -> Any:
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(_err(f"invalid CDI_* configuration:\n{exc}")) from None


def _prepare_local(settings: Any) -> None:
    """Folders the embedded defaults need (SQLite files, blobs or the upload spool)."""
    (settings.upload_tmp_dir if settings.blob_url else settings.blobs).mkdir(parents=True, exist_ok=True)
    for url in (settings.database_url, settings.broker_url):
        if "sqlite:///" in url:
            path = url.split("sqlite:///", 1)[1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)


def bootstrap_local_key(settings: Any) -> str | None:
    """On a database without tenants, create the admin tenant ``local`` and save its key.

    The key goes to ``<data_dir>/api-key`` (mode 600), once; returns it when it was created.
    """
    from app.storage.db import session_scope
    from app.storage.repositories import ApiKeyRepository, TenantRepository

    with session_scope(settings.database_url) as session:
        tenants = TenantRepository(session)
        if tenants.count():
            return None
        tenant = tenants.create("local", is_admin=True)
        key = ApiKeyRepository(session).create(tenant).plaintext
    path = Path(settings.data_dir) / "api-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def worker_argv(settings: Any, *, queues: str | None = None, concurrency: int | None = None,
                pool: str | None = None, loglevel: str = "INFO", hostname: str | None = None) -> list[str]:
    argv = [
        "worker", f"--loglevel={loglevel}",
        f"--queues={queues or f'{settings.audit_queue},{settings.callback_queue}'}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--pool={pool or settings.worker_pool}",
        "--without-gossip", "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    from app.logs import configure

    settings = _settings()
    configure(settings.log_format, settings.log_level)
    from app.queue import make_celery

    # The application names worker.tasks by name (``include``); the worker imports it.
    make_celery(settings).worker_main(worker_argv(settings, queues=args.queues, concurrency=args.concurrency,
                                   pool=args.pool, loglevel=args.loglevel, hostname=args.hostname))
    return 0


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not an address of this machine...), or None."""
    import errno
    import socket

    if not 0 < port < 65536:
        return "a port is a number from 1 to 65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"{host!r} is not an address of this machine ({exc.strerror or exc})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a port left in TIME_WAIT by a server just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is already in use (another `cdi serve`, or another program)"
            return exc.strerror or str(exc)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logs import configure
    from app.main import create_app
    from app.storage import migrate

    # Before anything is created: a busy port would otherwise fail only after the database,
    # the tenant, its key and the worker exist.
    problem = port_problem(args.host, args.port)
    if problem:
        return _err(f"cannot serve on {args.host}:{args.port}: {problem}; choose another port with --port N "
                    "(and --host for another address)")
    settings = _settings()
    configure(settings.log_format, settings.log_level)
    _prepare_local(settings)
    migrate.upgrade(settings.database_url)
    key = bootstrap_local_key(settings)
    if key is not None:
        print(f"Created the admin tenant 'local'. Its API key (saved in {Path(settings.data_dir) / 'api-key'}):",
              file=sys.stderr)
        print(f"  {key}", file=sys.stderr)
    # The worker shares the cores with the API: OpenMP threads that busy-wait would slow torch
    # down many times over, so they sleep when idle unless the operator says otherwise.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ,
           "CDI_DATABASE_URL": settings.database_url, "CDI_BROKER_URL": settings.broker_url,
           "CDI_BLOB_DIR": str(settings.blobs), "CDI_DATA_DIR": str(Path(settings.data_dir).absolute())}
    worker: subprocess.Popen[bytes] | None = None
    if not args.no_worker:
        # The same task code as `cdi worker`, in a child process: audits never run in the API.
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery",
             *worker_argv(settings, pool=args.worker_pool, hostname="embedded@%h")],
            env=env,
        )
    print(f"Serving the CDI audit service on http://{args.host}:{args.port} (API docs at /docs)", file=sys.stderr)

    def stop_worker() -> None:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def on_signal(signum: int, _frame: Any) -> None:
        # uvicorn handles SIGINT and SIGTERM itself, then raises the signal again once it has
        # stopped: it lands here, after the API, and the worker goes with it. SIGHUP, which
        # uvicorn leaves alone, asks uvicorn to stop the same way.
        if signum == signal.SIGHUP:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        stop_worker()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower())
    finally:
        stop_worker()
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    from app.errors import ServiceError
    from app.storage import migrate
    from app.storage.db import session_scope
    from app.storage.repositories import ApiKeyRepository, TenantRepository

    settings = _settings()
    if args.admin_command == "migrate":
        _prepare_local(settings)
        migrate.upgrade(settings.database_url, args.revision)
        print(f"database at revision {migrate.current(settings.database_url)}", file=sys.stderr)
        return 0
    if args.admin_command == "downgrade":
        migrate.downgrade(settings.database_url, args.revision)
        print(f"database at revision {migrate.current(settings.database_url)}", file=sys.stderr)
        return 0
    from app.admin import ensure_database

    problem = ensure_database(settings)
    if problem is not None:
        return _err(problem)
    try:
        with session_scope(settings.database_url) as session:
            tenants = TenantRepository(session)
            if args.admin_command == "create-tenant":
                if tenants.by_name(args.name) is not None:
                    return _err(f"a tenant named {args.name!r} exists already")
                tenant = tenants.create(args.name, is_admin=args.admin)
                print(tenant.id)
                return 0
            if args.admin_command == "create-key":
                owner = tenants.by_name(args.tenant)
                if owner is None:
                    return _err(f"no tenant named {args.tenant!r} (create it with `cdi admin create-tenant`)")
                key = ApiKeyRepository(session).create(owner)
                print(key.plaintext)
                print("Store this key now: it is shown only once.", file=sys.stderr)
                return 0
            if args.admin_command == "revoke-key":
                if not ApiKeyRepository(session).revoke(args.key_id):
                    return _err(f"no active key {args.key_id!r}")
                return 0
            if args.admin_command in ("register-model", "list-models"):
                from app.registry import ModelRegistry

                registry = ModelRegistry(session, settings)
                if args.admin_command == "list-models":
                    for m in registry.list():
                        print(f"{m.id:24s} {m.family or '?':16s} {m.origin:10s} {m.source}")
                    return 0
                info = registry.register(args.model_id, args.source, args.revision, args.description,
                                         hash_weights=True)
                print(f"registered {info.id}: {info.family}, conditioning {info.conditioning}")
                return 0
    except ServiceError as exc:
        return _err(f"{exc.message} [{exc.code}]")
    raise AssertionError(args.admin_command)


def _with_database(fn: Any) -> Any:
    """An admin command that needs the migrated database (app.admin)."""

    def run(args: argparse.Namespace) -> int:
        from app.admin import ensure_database

        settings = _settings()
        problem = ensure_database(settings)
        if problem is not None:
            return _err(problem)
        return int(fn(args, settings) or 0)

    return run


def cmd_requeue(args: argparse.Namespace) -> int:
    from app.admin import cmd_reconcile

    return _with_database(cmd_reconcile)(args)


# --- client commands ------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from app.client import CdiClient

    key = args.api_key or os.environ.get("CDI_API_KEY")
    if not key:
        key_file = _key_file()
        if key_file.is_file():
            key = key_file.read_text().strip()
    if not key:
        raise KeyMissing(f"no API key: give it with --api-key KEY or in CDI_API_KEY; the key of `cdi serve` is "
                         f"read from {_key_file().absolute()} when present (run from the folder where `cdi serve` "
                         "runs, or set CDI_DATA_DIR to its data folder)")
    return CdiClient(args.url or os.environ.get("CDI_URL", DEFAULT_URL), key)


def _key_file() -> Path:
    """Where the client looks for the embedded mode's key: ``$CDI_DATA_DIR/api-key``, ``.cdi/api-key``."""
    return Path(os.environ.get("CDI_DATA_DIR", ".cdi")) / "api-key"


def _key_source(args: argparse.Namespace) -> str:
    if getattr(args, "api_key", None):
        return "the key given with --api-key"
    if os.environ.get("CDI_API_KEY"):
        return "the key in CDI_API_KEY"
    return f"the key read from {_key_file().absolute()}"


class KeyMissing(Exception):
    """No API key was given, set or found."""


@contextmanager
def _as_zip(path: Path) -> Iterator[Path]:
    """A folder zipped to a temporary file (its images at the top), or the zip itself."""
    if not path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cdi-submit-") as tmp:
        out = Path(tmp) / f"{path.name}.zip"
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted(path.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    zf.write(f, f.relative_to(path).as_posix())
        yield out


def status_line(status: dict[str, Any]) -> str:
    p = status.get("progress") or {}
    line = f"{status['id']}  {status['state']}"
    if p.get("total") and status["state"] not in ("done", "failed", "cancelled"):
        line += f"  {p.get('stage')}: {p.get('done')}/{p.get('total')}"
    if status.get("verdict"):
        from cdi.pvalue import format_p_value

        line += f"  verdict={status['verdict']} p={format_p_value(status.get('p_value'))}"
    if status.get("error"):
        line += f"  error={status['error']['code']}: {status['error']['message']}"
    return line


class StatusLine:
    """Shows an audit's status while ``--wait`` polls: one line redrawn in place on a terminal;
    elsewhere (a log, a pipe) a line only when the state or the stage changes."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0
        self._key: tuple[Any, ...] | None = None

    def __call__(self, status: dict[str, Any]) -> None:
        line = status_line(status)
        final = status["state"] in ("done", "failed", "cancelled")
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)) + ("\n" if final else ""))
            self._width = 0 if final else len(line)
        else:
            key = (status["state"], (status.get("progress") or {}).get("stage"))
            if key != self._key or final:
                self.stream.write(line + "\n")
            self._key = key
        self.stream.flush()

    def close(self) -> None:
        """End a line left open (an interrupt, an error)."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _client_call(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        from app.client import ClientError, ServiceError

        try:
            return int(fn(args) or 0)
        except KeyMissing as exc:
            return _err(str(exc))
        except ServiceError as exc:
            if exc.status == 401:
                return _err(f"the service refused {_key_source(args)}: {exc.message} [{exc.code}]. Give the "
                            "tenant's key with --api-key KEY or CDI_API_KEY (an admin creates one with "
                            "`cdi admin create-key TENANT`)")
            return _err(f"{exc.message} [{exc.code}]")
        except ClientError as exc:
            return _err(str(exc))

    return wrapper


@_client_call
def cmd_submit(args: argparse.Namespace) -> int:
    options = {"alpha": args.alpha, "protocol": args.protocol, "features": args.features, "seed": args.seed,
               "precision": args.precision, "batch_size": args.batch_size, "callback_url": args.callback_url,
               "captions": args.captions, "labels": args.labels}
    with _client(args) as client:
        if len(args.images) == 1:
            # A folder holding published/ and unpublished/ is zipped with both at the top.
            with _as_zip(Path(args.images[0])) as archive:
                accepted = client.submit(model=args.model, archive=archive, **options)
        elif len(args.images) == 2:
            with _as_zip(Path(args.images[0])) as pub, _as_zip(Path(args.images[1])) as unpub:
                accepted = client.submit(model=args.model, published=pub, unpublished=unpub, **options)
        else:
            return _err("give ARCHIVE (or a folder with published/ and unpublished/), or PUBLISHED UNPUBLISHED")
        print(accepted["id"])
        if not args.wait:
            return 0
        line = StatusLine()
        try:
            status = client.wait(accepted["id"], poll=args.poll, on_status=line)
        finally:
            line.close()
        if status["state"] != "done":
            return 1
        print(json.dumps({"verdict": status.get("verdict"), "p_value": status.get("p_value")}))
        return 0


@_client_call
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait:
            line = StatusLine()
            try:
                status = client.wait(args.audit_id, poll=args.poll, on_status=line)
            finally:
                line.close()
        else:
            status = client.status(args.audit_id)
        print(json.dumps(status, indent=2))
        return 0 if status["state"] != "failed" else 1


@_client_call
def cmd_fetch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.pdf:
            data = client.report_pdf(args.audit_id)
            out = Path(args.output or f"cdi-audit-{args.audit_id}.pdf")
            out.write_bytes(data)
            print(out, file=sys.stderr)
            return 0
        text = json.dumps(client.report(args.audit_id), indent=2)
        if args.output:
            Path(args.output).write_text(text + "\n")
        else:
            print(text)
        return 0


# --- registration ---------------------------------------------------------------------------


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"the service's URL (default: $CDI_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", help="API key (default: $CDI_API_KEY, or the embedded mode's .cdi/api-key)")


def register_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the whole service on this machine (SQLite, API and a local worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="start the API only")
    p.add_argument("--worker-pool", choices=["prefork", "solo", "threads"], default=None)
    p.set_defaults(func=cmd_serve)


def register_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a Celery worker that runs audits (configured by CDI_*)")
    p.add_argument("--queues", help="comma-separated queues (default: audits and callbacks)")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--pool", choices=["prefork", "solo", "threads"], default=None)
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", default=None, help="Celery node name (default: celery@host)")
    p.set_defaults(func=cmd_worker)


def register_admin(sub: Any) -> None:
    p = sub.add_parser("admin", help="operator commands: migrations, tenants, API keys, models")
    admin = p.add_subparsers(dest="admin_command", required=True)
    q = admin.add_parser("migrate", help="upgrade the database schema (Alembic)")
    q.add_argument("revision", nargs="?", default="head")
    q = admin.add_parser("downgrade", help="downgrade the database schema (default: to empty)")
    q.add_argument("revision", nargs="?", default="base")
    q = admin.add_parser("create-tenant", help="create a tenant; prints its id")
    q.add_argument("name")
    q.add_argument("--admin", action="store_true", help="may register models")
    q = admin.add_parser("create-key", help="create an API key for a tenant; prints it once")
    q.add_argument("tenant", help="the tenant's name")
    q = admin.add_parser("revoke-key", help="revoke an API key")
    q.add_argument("key_id", help="the 16 hex digits after 'cdi_'")
    q = admin.add_parser("register-model", help="register a model the service can audit")
    q.add_argument("model_id")
    q.add_argument("source", metavar="PATH_OR_HUB_ID")
    q.add_argument("--revision", default=None)
    q.add_argument("--description", default="")
    admin.add_parser("list-models", help="list the models the service can audit")
    q = admin.add_parser("requeue-orphans", help="queue again the audits whose worker died (= reconcile)")
    q.set_defaults(func=cmd_requeue)
    from app.admin import register as register_more

    register_more(admin, _with_database)
    p.set_defaults(func=cmd_admin)


def register_submit(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit an audit to a CDI service")
    p.add_argument("images", nargs="+", metavar="ZIP_OR_FOLDER",
                   help="one zip (or folder) with published/ and unpublished/, or two: PUBLISHED UNPUBLISHED")
    p.add_argument("--model", required=True, help="a model id (see GET /v1/models)")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--protocol", choices=[p.value for p in Protocol], default=None)
    p.add_argument("--features", choices=["verdict", "all", "gradient-free"], default=None,
                   help="verdict (the service's default): only what the verdict reads; all: the 26 features")
    p.add_argument("--precision", choices=["fp32", "auto", "bf16", "fp16"], default=None)
    p.add_argument("--batch-size", default=None, metavar="N|auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--captions", default=None, help="CSV or JSONL of captions")
    p.add_argument("--labels", default=None, help="CSV or JSONL of class labels")
    p.add_argument("--callback-url", default=None)
    p.add_argument("--wait", action="store_true", help="poll until the audit ends")
    p.add_argument("--poll", type=float, default=2.0)
    _client_options(p)
    p.set_defaults(func=cmd_submit)


def register_status(sub: Any) -> None:
    p = sub.add_parser("status", help="show an audit's state")
    p.add_argument("audit_id")
    p.add_argument("--wait", action="store_true", help="poll until the audit ends")
    p.add_argument("--poll", type=float, default=2.0)
    _client_options(p)
    p.set_defaults(func=cmd_status)


def register_fetch(sub: Any) -> None:
    p = sub.add_parser("fetch", help="download an audit's report (JSON, or --pdf)")
    p.add_argument("audit_id")
    p.add_argument("--pdf", action="store_true")
    p.add_argument("-o", "--output", default=None, help="file to write (JSON default: standard output)")
    _client_options(p)
    p.set_defaults(func=cmd_fetch)


def main(argv: list[str] | None = None) -> int:
    """The service's commands alone (``python -m app.cli``), for images without the library CLI."""
    parser = argparse.ArgumentParser(prog="cdi")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (register_serve, register_worker, register_admin, register_submit, register_status,
                     register_fetch):
        register(sub)
    args = parser.parse_args(argv)
    from cdi.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
