"""Alembic: upgrade from empty and downgrade to empty, on Postgres and SQLite; no drift."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from app.storage import migrate

from .conftest import PG_ADMIN, _pg_connect

pytestmark = pytest.mark.integration

TABLES = {"tenants", "api_keys", "models", "audits", "audit_images", "audit_runs", "features", "blobs",
          "blob_claims", "worker_heartbeats", "audit_shards"}


@pytest.fixture
def scratch_pg() -> Iterator[str]:
    """An empty database of its own (the session's shared one is migrated already)."""
    admin = _pg_connect(PG_ADMIN)
    name = f"cdi_test_mig_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def check_drift(url: str) -> None:
    """The models describe exactly the schema the migrations create."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.storage.models import Base

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff


def round_trip(url: str) -> None:
    assert tables(url) == set()
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    assert tables(url) == TABLES
    check_drift(url)
    migrate.downgrade(url)
    assert migrate.current(url) is None
    assert tables(url) == set()
    migrate.upgrade(url)  # and up again: the downgrade left nothing behind that blocks it
    assert tables(url) == TABLES


def test_postgres_upgrade_and_downgrade(scratch_pg: str) -> None:
    round_trip(scratch_pg)


def test_sqlite_upgrade_and_downgrade(tmp_path: Path) -> None:
    round_trip(f"sqlite:///{tmp_path / 'cdi.db'}")


def test_cli_migrate(scratch_pg: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    monkeypatch.setenv("CDI_DATABASE_URL", scratch_pg)
    assert main(["admin", "migrate"]) == 0
    assert tables(scratch_pg) == TABLES
    assert main(["admin", "create-tenant", "acme"]) == 0
    tenant_id = capsys.readouterr().out.strip()
    assert uuid.UUID(tenant_id)
    assert main(["admin", "create-key", "acme"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("cdi_")
    assert main(["admin", "create-key", "nobody"]) == 2
    assert main(["admin", "downgrade"]) == 0
    assert tables(scratch_pg) == set()
