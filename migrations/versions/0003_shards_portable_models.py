"""Sharded audits and portable model references.

* ``audit_shards``: an audit's images split into shards (consecutive positions), each
  extracted by whichever worker takes its task; ``state`` says whether its features are all
  stored, ``lease_owner``/``lease_expires_at`` guard it like the audit's own lease.
* ``audit_runs.shard``: the shard an attempt extracted (NULL: the whole audit, or its final
  step of scoring, test, controls and report).
* ``models.weight_sha256``: the registered weight files' SHA-256s; a worker refuses weights
  that differ.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_shards",
        sa.Column("audit_id", sa.Uuid(), sa.ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("shard", sa.Integer(), primary_key=True),
        sa.Column("first", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    with op.batch_alter_table("audit_runs") as batch:
        batch.add_column(sa.Column("shard", sa.Integer(), nullable=True))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("weight_sha256", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("weight_sha256")
    with op.batch_alter_table("audit_runs") as batch:
        batch.drop_column("shard")
    op.drop_table("audit_shards")
