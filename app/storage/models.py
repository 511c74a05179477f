"""SQLAlchemy 2.0 models of the service's tables.

The schema is created and changed only by the Alembic migrations in ``migrations/``; these
classes describe it for queries. Timestamps are stored in UTC.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware ones")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class AuditState(str, enum.Enum):
    QUEUED = "queued"
    VALIDATING = "validating"
    EXTRACTING = "extracting"
    SCORING = "scoring"
    REPORTING = "reporting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (AuditState.DONE, AuditState.FAILED, AuditState.CANCELLED)


TERMINAL_STATES = tuple(s.value for s in AuditState if s.is_terminal)
RUNNING_STATES = (
    AuditState.VALIDATING.value,
    AuditState.EXTRACTING.value,
    AuditState.SCORING.value,
    AuditState.REPORTING.value,
)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The key that signs this tenant's callbacks (Standard Webhooks: ``whsec_`` + base64).
    webhook_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    #: Days this tenant's ended audits keep their image records, report and PDF (None: the
    #: deployment's ``CDI_RETENTION_DAYS``; 0: until deleted).
    retention_days: Mapped[int | None] = mapped_column(Integer, default=None)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """An API key, stored as the SHA-256 of its secret (keys are 256-bit random tokens)."""

    __tablename__ = "api_keys"

    #: The public part of the key, used to find the row (``cdi_<key_id>_<secret>``).
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class RegisteredModel(Base):
    """A model this deployment can audit: a diffusers directory, or a hub id and revision."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(200), default=None)
    family: Mapped[str | None] = mapped_column(String(100), default=None)
    conditioning: Mapped[str | None] = mapped_column(String(20), default=None)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: SHA-256 of every weight file (relative path → hash), when the registry could read them:
    #: a worker refuses weights that differ (a path is the same name on every host, not the
    #: same file).
    weight_sha256: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Audit(Base):
    __tablename__ = "audits"
    __table_args__ = (
        Index("ix_audits_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_audits_report_pdf_sha256", "report_pdf_sha256"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(20), default=AuditState.QUEUED.value, index=True)
    #: Model id as submitted, and the reference resolved at submission (the registry may change).
    model_id: Mapped[str] = mapped_column(String(200))
    model_source: Mapped[str] = mapped_column(Text)
    model_revision: Mapped[str | None] = mapped_column(String(200), default=None)
    #: alpha, protocol, features, seed.
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    callback_url: Mapped[str | None] = mapped_column(Text, default=None)
    n_published: Mapped[int] = mapped_column(Integer)
    n_unpublished: Mapped[int] = mapped_column(Integer)
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    has_captions: Mapped[bool] = mapped_column(Boolean, default=False)
    has_labels: Mapped[bool] = mapped_column(Boolean, default=False)

    progress_stage: Mapped[str | None] = mapped_column(String(20), default=None)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)

    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)

    #: The JSON report (``cdi.report.result_to_dict``) and its PDF's blob, once done. Deferred: a
    #: report of thousands of images weighs megabytes, and status polls and list pages, which
    #: read the rest of the row, never load it (bench/status_reads.py); reading the attribute
    #: loads it then.
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None, deferred=True)
    verdict: Mapped[str | None] = mapped_column(String(20), default=None)
    p_value: Mapped[float | None] = mapped_column(Float, default=None)
    report_pdf_sha256: Mapped[str | None] = mapped_column(String(64), default=None)

    #: The worker that holds the audit, and until when (renewed by heartbeats).
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    images_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Keep the uploaded images after the audit ends (default: deleted when it ends).
    retain_images: Mapped[bool] = mapped_column(Boolean, default=False)
    #: When the task was handed to the broker; NULL while it waits to be sent (the outbox).
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    #: When its owner deleted it (images, report, PDF and runs are gone; this row remains).
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    callback_state: Mapped[str | None] = mapped_column(String(20), default=None)

    images: Mapped[list[AuditImage]] = relationship(
        back_populates="audit", cascade="all, delete-orphan", passive_deletes=True
    )
    runs: Mapped[list[AuditRun]] = relationship(
        back_populates="audit", cascade="all, delete-orphan", passive_deletes=True,
        order_by="AuditRun.attempt",
    )


class AuditImage(Base):
    """One uploaded image of an audit: which set, its name in the upload, caption and label."""

    __tablename__ = "audit_images"
    __table_args__ = (Index("ix_audit_images_sha256", "sha256"),)

    audit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: "published" or "unpublished".
    role: Mapped[str] = mapped_column(String(12))
    name: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    caption: Mapped[str | None] = mapped_column(Text, default=None)
    label: Mapped[int | None] = mapped_column(Integer, default=None)

    audit: Mapped[Audit] = relationship(back_populates="images")


class AuditRun(Base):
    """One attempt of a worker at an audit: what it computed and what it found cached."""

    __tablename__ = "audit_runs"

    audit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    outcome: Mapped[str | None] = mapped_column(String(20), default=None)
    #: Images whose features this attempt computed / found in the feature cache.
    features_computed: Mapped[int] = mapped_column(Integer, default=0)
    features_reused: Mapped[int] = mapped_column(Integer, default=0)
    #: The library's pass counts for this attempt (``AuditResult.passes``), when it finished.
    forward_passes: Mapped[int] = mapped_column(BigInteger, default=0)
    backward_passes: Mapped[int] = mapped_column(BigInteger, default=0)
    #: The shard this attempt extracted; None for the whole audit or its final step.
    shard: Mapped[int | None] = mapped_column(Integer, default=None)

    audit: Mapped[Audit] = relationship(back_populates="runs")


class AuditShard(Base):
    """A slice of an audit's images (positions ``first`` … ``first + count - 1``) whose features
    one worker extracts. ``state`` is ``pending`` until all its features are stored, then
    ``done``; its lease works like the audit's."""

    __tablename__ = "audit_shards"

    audit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    first: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(12), default="pending")
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class Blob(Base):
    """A stored blob. Blobs are deleted through these rows only (see :mod:`app.storage.ledger`)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlobClaim(Base):
    """A writer's claim on a blob it is about to store and reference: the blob is not deleted
    while the claim lives. Removed in the transaction that writes the references."""

    __tablename__ = "blob_claims"
    __table_args__ = (Index("ix_blob_claims_sha256", "sha256"),)

    claim_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column()


class WorkerHeartbeat(Base):
    """A worker process that said it is alive at ``seen_at`` (``/readyz`` reads these)."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column()


class FeatureRow(Base):
    """A cached per-image feature vector.

    ``cache_key`` is computed by :func:`cdi.audit.audit` from the model's identity, the feature
    layout version, the feature configuration, the seed, the dtype and the precision, and
    scoped to ``tenant_id`` (:func:`app.storage.repositories.hash_cache_key`): with the image's
    SHA-256 it identifies the vector exactly, and no tenant's audit reads another tenant's rows.
    A row with no tenant belongs to the shared cache (``CDI_FEATURE_CACHE_SCOPE=shared``). A
    vector may be partial (NaN where a feature was not computed); a later save completes it.
    """

    __tablename__ = "features"
    __table_args__ = (Index("ix_features_sha256", "sha256"), Index("ix_features_tenant_sha256", "tenant_id", "sha256"))

    #: SHA-256 of the key given by the library (its length and format are the library's).
    cache_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                                        default=None)
