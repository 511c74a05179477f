"""Tenant-scoped feature cache, retention per tenant.

* ``features.tenant_id``: the tenant whose audits computed the row (its ``cache_key`` is
  then scoped to that tenant too); NULL for a row of the shared cache, which a deployment
  uses only when its operator sets ``CDI_FEATURE_CACHE_SCOPE=shared``. The rows cached before
  this revision were shared between tenants: they are dropped (a cache: any audit that needs
  them computes them again), so that no tenant's audit finds another's work.
* ``tenants.retention_days``: how long this tenant's ended audits keep their image records,
  report and PDF (NULL: the deployment's ``CDI_RETENTION_DAYS``).

Revision ID: 0004_tenancy
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_tenancy"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM features")
    with op.batch_alter_table("features") as batch:
        batch.add_column(sa.Column("tenant_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key("fk_features_tenant_id", "tenants", ["tenant_id"], ["id"], ondelete="CASCADE")
        batch.create_index("ix_features_tenant_sha256", ["tenant_id", "sha256"])
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("retention_days", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("retention_days")
    op.execute("DELETE FROM features")
    with op.batch_alter_table("features") as batch:
        batch.drop_index("ix_features_tenant_sha256")
        batch.drop_constraint("fk_features_tenant_id", type_="foreignkey")
        batch.drop_column("tenant_id")
