"""Initial schema: tenants, API keys, models, audits, their images and runs, the feature cache.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Self-contained on purpose: a migration must not change when app/storage/models.py does.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "models",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("revision", sa.String(200), nullable=True),
        sa.Column("family", sa.String(100), nullable=True),
        sa.Column("conditioning", sa.String(20), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "audits",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("model_source", sa.Text(), nullable=False),
        sa.Column("model_revision", sa.String(200), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("n_published", sa.Integer(), nullable=False),
        sa.Column("n_unpublished", sa.Integer(), nullable=False),
        sa.Column("upload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("has_captions", sa.Boolean(), nullable=False),
        sa.Column("has_labels", sa.Boolean(), nullable=False),
        sa.Column("progress_stage", sa.String(20), nullable=True),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("verdict", sa.String(20), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("report_pdf_sha256", sa.String(64), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("images_deleted", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("callback_state", sa.String(20), nullable=True),
    )
    op.create_index("ix_audits_state", "audits", ["state"])
    op.create_index("ix_audits_tenant_created", "audits", ["tenant_id", "created_at", "id"])
    op.create_table(
        "audit_images",
        sa.Column("audit_id", sa.Uuid(), sa.ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("role", sa.String(12), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("caption", sa.Text(), nullable=True),
        sa.Column("label", sa.Integer(), nullable=True),
    )
    op.create_index("ix_audit_images_sha256", "audit_images", ["sha256"])
    op.create_table(
        "audit_runs",
        sa.Column("audit_id", sa.Uuid(), sa.ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("features_computed", sa.Integer(), nullable=False),
        sa.Column("features_reused", sa.Integer(), nullable=False),
        sa.Column("forward_passes", sa.BigInteger(), nullable=False),
        sa.Column("backward_passes", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "features",
        sa.Column("cache_key", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("shape", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("features")
    op.drop_table("audit_runs")
    op.drop_index("ix_audit_images_sha256", table_name="audit_images")
    op.drop_table("audit_images")
    op.drop_index("ix_audits_tenant_created", table_name="audits")
    op.drop_index("ix_audits_state", table_name="audits")
    op.drop_table("audits")
    op.drop_table("models")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
