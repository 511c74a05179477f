"""Blob ledger and claims, the send-after-commit marker, retention, callback secrets, worker heartbeats.

* ``blobs``: one row per stored blob. A blob is deleted only through its row (never by
  listing the store), so the rule below works the same on a local folder and an object store.
* ``blob_claims``: an upload's (or a report's) claim on blobs it is about to write, committed
  before the blob becomes visible and removed in the transaction that writes the references.
  A blob is deleted only while nothing references or claims it, under its row's lock.
* ``audits.enqueued_at``: set once the task was handed to the broker; an audit still without
  it after commit (the API died in between) is sent by the reconciler.
* ``audits.retain_images``, ``audits.deleted_at``: retention.
* ``tenants.webhook_secret``: the key that signs the tenant's callbacks.
* ``worker_heartbeats``: live workers, for ``/readyz``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "blob_claims",
        sa.Column("claim_id", sa.Uuid(), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_blob_claims_sha256", "blob_claims", ["sha256"])
    op.create_index("ix_audits_report_pdf_sha256", "audits", ["report_pdf_sha256"])
    op.create_index("ix_features_sha256", "features", ["sha256"])
    with op.batch_alter_table("audits") as batch:
        batch.add_column(sa.Column("enqueued_at", TS, nullable=True))
        batch.add_column(sa.Column("retain_images", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("deleted_at", TS, nullable=True))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.String(100), nullable=True))
    op.create_table(
        "worker_heartbeats",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("seen_at", TS, nullable=False),
    )
    # Audits that exist already were sent when they were created.
    op.execute("UPDATE audits SET enqueued_at = created_at")
    # The blobs that exist already: every image still referenced, and every report PDF.
    op.execute(
        "INSERT INTO blobs (sha256, size, created_at) "
        "SELECT sha256, MAX(size), CURRENT_TIMESTAMP FROM audit_images GROUP BY sha256"
    )
    op.execute(
        "INSERT INTO blobs (sha256, size, created_at) "
        "SELECT DISTINCT report_pdf_sha256, 0, CURRENT_TIMESTAMP FROM audits "
        "WHERE report_pdf_sha256 IS NOT NULL "
        "AND report_pdf_sha256 NOT IN (SELECT sha256 FROM blobs)"
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("webhook_secret")
    with op.batch_alter_table("audits") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("retain_images")
        batch.drop_column("enqueued_at")
    op.drop_index("ix_features_sha256", table_name="features")
    op.drop_index("ix_audits_report_pdf_sha256", table_name="audits")
    op.drop_index("ix_blob_claims_sha256", table_name="blob_claims")
    op.drop_table("blob_claims")
    op.drop_table("blobs")
