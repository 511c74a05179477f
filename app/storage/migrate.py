"""Run the Alembic migrations from code (operator commands, the embedded mode, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def _root() -> Path:
    """The folder holding alembic.ini and migrations/: the source tree (editable installs,
    a checkout), else the working directory (the Docker images run from the source folder)."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "migrations" / "env.py").is_file():
            return candidate
    raise RuntimeError("migrations/ not found: run from the project's folder")


def alembic_config(database_url: str) -> Config:
    root = _root()
    ini = root / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from app.storage.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
