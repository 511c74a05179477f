"""Repositories: every query the service makes, behind small typed methods.

Routes, tasks and commands never write SQL; they call these. A repository works inside the
caller's session and never commits: the caller owns the transaction (one per request, one
per worker step), so a failure leaves nothing half-written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import and_, delete, func, null, or_, select, update
from sqlalchemy.orm import Session

from app import security
from app.storage.models import (
    RUNNING_STATES,
    TERMINAL_STATES,
    ApiKey,
    Audit,
    AuditImage,
    AuditRun,
    AuditShard,
    AuditState,
    FeatureRow,
    RegisteredModel,
    Tenant,
    utcnow,
)


class TenantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, name: str, *, is_admin: bool = False) -> Tenant:
        tenant = Tenant(name=name, is_admin=is_admin)
        self.session.add(tenant)
        self.session.flush()
        return tenant

    def by_name(self, name: str) -> Tenant | None:
        return self.session.scalar(select(Tenant).where(Tenant.name == name))

    def get(self, tenant_id: uuid.UUID) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def count(self) -> int:
        return int(self.session.scalar(select(func.count()).select_from(Tenant)) or 0)

    def webhook_secret(self, tenant_id: uuid.UUID, *, rotate: bool = False) -> str:
        """The tenant's callback signing secret, created on first use (or replaced with ``rotate``)."""
        from app.callbacks import new_secret

        tenant = self.session.get(Tenant, tenant_id, with_for_update=True)
        if tenant is None:
            raise LookupError(tenant_id)
        if tenant.webhook_secret is None or rotate:
            tenant.webhook_secret = new_secret()
            self.session.flush()
        return tenant.webhook_secret


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, tenant: Tenant) -> security.NewKey:
        new = security.generate_key()
        self.session.add(ApiKey(key_id=new.key_id, tenant_id=tenant.id, secret_sha256=new.secret_sha256))
        self.session.flush()
        return new

    def authenticate(self, plaintext: str) -> Tenant | None:
        """The tenant owning this key, if the key is well-formed, known, unrevoked and matches."""
        parsed = security.parse_key(plaintext)
        if parsed is None:
            return None
        key_id, secret = parsed
        row = self.session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None or not security.secret_matches(secret, row.secret_sha256):
            return None
        return row.tenant

    def touch(self, plaintext: str, every: timedelta = timedelta(minutes=1)) -> bool:
        """Record that the key was used (at most once per ``every``, to spare the database)."""
        parsed = security.parse_key(plaintext)
        if parsed is None:
            return False
        now = utcnow()
        result = self.session.execute(
            update(ApiKey).where(ApiKey.key_id == parsed[0],
                                 or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - every))
            .values(last_used_at=now).execution_options(synchronize_session=False))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def revoke(self, key_id: str) -> bool:
        result = self.session.execute(
            update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


class ModelRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, model_id: str) -> RegisteredModel | None:
        return self.session.get(RegisteredModel, model_id)

    def list(self) -> list[RegisteredModel]:
        return list(self.session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)))

    def upsert(self, model_id: str, *, source: str, revision: str | None, family: str | None,
               conditioning: str | None, description: str = "",
               weight_sha256: dict[str, str] | None = None) -> RegisteredModel:
        row = self.session.get(RegisteredModel, model_id)
        if row is None:
            row = RegisteredModel(id=model_id, source=source)
            self.session.add(row)
        row.source, row.revision, row.family = source, revision, family
        row.conditioning, row.description = conditioning, description
        row.weight_sha256 = dict(weight_sha256) if weight_sha256 else None
        self.session.flush()
        return row

    def delete(self, model_id: str) -> bool:
        result = self.session.execute(delete(RegisteredModel).where(RegisteredModel.id == model_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Page:
    items: list[Audit]
    next_cursor: str | None


def _encode_cursor(created_at: datetime, audit_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{audit_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The cursor's (created_at in UTC, id); ValueError for anything this API did not give."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded.encode("ascii"))
        ts, _, ident = raw.decode("utf-8").partition("|")
        created = datetime.fromisoformat(ts)
        if created.tzinfo is None or not 2000 <= created.year <= 9000:
            raise ValueError("timestamp out of range")
        return created.astimezone(timezone.utc), uuid.UUID(ident)
    except (UnicodeError, OverflowError, TypeError, binascii.Error) as exc:
        raise ValueError(str(exc)) from None


class InvalidCursor(ValueError):
    pass


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # --- creation and reading -----------------------------------------------------------

    def create(self, *, tenant_id: uuid.UUID, model_id: str, model_source: str, model_revision: str | None,
               options: Mapping[str, Any], callback_url: str | None,
               images: Sequence[tuple[str, str, str, int, str | None, int | None]],
               retain_images: bool = False) -> Audit:
        """A queued audit; ``images`` are (role, name, sha256, size, caption, label) in order."""
        audit = Audit(
            tenant_id=tenant_id, model_id=model_id, model_source=model_source, model_revision=model_revision,
            options=dict(options), callback_url=callback_url,
            n_published=sum(1 for im in images if im[0] == "published"),
            n_unpublished=sum(1 for im in images if im[0] == "unpublished"),
            upload_bytes=sum(im[3] for im in images),
            has_captions=any(im[4] is not None for im in images),
            has_labels=any(im[5] is not None for im in images),
            state=AuditState.QUEUED.value, retain_images=retain_images,
        )
        self.session.add(audit)
        self.session.flush()
        self.session.add_all(
            AuditImage(audit_id=audit.id, position=i, role=role, name=name, sha256=sha, size=size,
                       caption=caption, label=label)
            for i, (role, name, sha, size, caption, label) in enumerate(images)
        )
        self.session.flush()
        return audit

    def get(self, audit_id: uuid.UUID) -> Audit | None:
        return self.session.get(Audit, audit_id)

    def get_for_tenant(self, audit_id: uuid.UUID, tenant_id: uuid.UUID) -> Audit | None:
        return self.session.scalar(select(Audit).where(Audit.id == audit_id, Audit.tenant_id == tenant_id))

    def list_for_tenant(self, tenant_id: uuid.UUID, *, limit: int, cursor: str | None = None,
                        state: str | None = None) -> Page:
        """Newest first; ``cursor`` is the ``next_cursor`` of the previous page."""
        q = select(Audit).where(Audit.tenant_id == tenant_id)
        if state is not None:
            q = q.where(Audit.state == state)
        if cursor:
            try:
                created_at, audit_id = _decode_cursor(cursor)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidCursor(str(exc)) from None
            q = q.where(or_(Audit.created_at < created_at,
                            and_(Audit.created_at == created_at, Audit.id < audit_id)))
        rows = list(self.session.scalars(q.order_by(Audit.created_at.desc(), Audit.id.desc()).limit(limit + 1)))
        next_cursor = _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        return Page(rows[:limit], next_cursor)

    def images(self, audit_id: uuid.UUID) -> list[AuditImage]:
        return list(self.session.scalars(
            select(AuditImage).where(AuditImage.audit_id == audit_id).order_by(AuditImage.position)))

    def runs(self, audit_id: uuid.UUID) -> list[AuditRun]:
        return list(self.session.scalars(
            select(AuditRun).where(AuditRun.audit_id == audit_id).order_by(AuditRun.attempt)))

    def orphaned(self, grace: timedelta) -> list[Audit]:
        """Running audits whose lease ran out more than ``grace`` ago: their worker died."""
        return list(self.session.scalars(
            select(Audit).where(Audit.state.in_(RUNNING_STATES), Audit.lease_expires_at < utcnow() - grace)
        ))

    def requeue(self, audit_id: uuid.UUID) -> bool:
        """Put an orphaned audit back to ``queued`` (only if it is still orphaned)."""
        now = utcnow()
        result = self.session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.state.in_(RUNNING_STATES), Audit.lease_expires_at < now)
            .values(state=AuditState.QUEUED.value, lease_owner=None, lease_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    # --- the worker's lease -------------------------------------------------------------

    def claim(self, audit_id: uuid.UUID, owner: str, lease: timedelta) -> bool:
        """Take the audit for ``owner`` unless it is final or another live worker holds it."""
        now = utcnow()
        result = self.session.execute(
            update(Audit)
            .where(
                Audit.id == audit_id,
                Audit.state.not_in(TERMINAL_STATES),
                or_(Audit.lease_owner.is_(None), Audit.lease_expires_at < now, Audit.lease_owner == owner),
            )
            .values(lease_owner=owner, lease_expires_at=now + lease, attempts=Audit.attempts + 1,
                    started_at=func.coalesce(Audit.started_at, now), updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def heartbeat(self, audit_id: uuid.UUID, owner: str, lease: timedelta, **progress: Any) -> str | None:
        """Extend the lease and record progress; the audit's state, ``"cancelled"`` if it was cancelled,
        or ``None`` if another worker holds it now (or finished it)."""
        now = utcnow()
        values: dict[str, Any] = {"lease_expires_at": now + lease, "updated_at": now, **progress}
        result = self.session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.lease_owner == owner, Audit.state.not_in(TERMINAL_STATES))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            state = self.session.scalar(select(Audit.state).where(Audit.id == audit_id))
            return state if state == AuditState.CANCELLED.value else None
        return self.session.scalar(select(Audit.state).where(Audit.id == audit_id))

    def finish(self, audit_id: uuid.UUID, owner: str, *, state: AuditState, report: dict[str, Any] | None = None,
               verdict: str | None = None, p_value: float | None = None, pdf_sha256: str | None = None,
               error_code: str | None = None, error_message: str | None = None,
               progress_stage: str | None = None) -> bool:
        """Move the audit to a final state, if ``owner`` still holds it and it is not final yet.

        ``progress_stage``: the stage the audit ended in, written with it (the heartbeat that
        would have written it may not have run since the stage began).
        """
        now = utcnow()
        stage = {} if progress_stage is None else {"progress_stage": progress_stage}
        result = self.session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.lease_owner == owner, Audit.state.not_in(TERMINAL_STATES))
            .values(state=state.value, report=report, verdict=verdict, p_value=p_value,
                    report_pdf_sha256=pdf_sha256, error_code=error_code, error_message=error_message,
                    finished_at=now, updated_at=now, lease_owner=None, lease_expires_at=None, **stage)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def release(self, audit_id: uuid.UUID, owner: str) -> None:
        """Give the lease up without finishing (a transient error: the task will be retried)."""
        self.session.execute(
            update(Audit).where(Audit.id == audit_id, Audit.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )

    def fail_unleased(self, audit_id: uuid.UUID, code: str, message: str) -> bool:
        """Fail an audit nobody holds (it could not be queued, or its input vanished)."""
        now = utcnow()
        result = self.session.execute(
            update(Audit).where(Audit.id == audit_id, Audit.state.not_in(TERMINAL_STATES))
            .values(state=AuditState.FAILED.value, error_code=code, error_message=message, finished_at=now,
                    updated_at=now, lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def cancel(self, audit: Audit) -> bool:
        """Cancel a queued or running audit; a running worker notices at its next heartbeat."""
        if audit.state in TERMINAL_STATES:
            return False
        now = utcnow()
        result = self.session.execute(
            update(Audit).where(Audit.id == audit.id, Audit.state.not_in(TERMINAL_STATES))
            .values(state=AuditState.CANCELLED.value, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        self.session.refresh(audit)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def set_callback_state(self, audit_id: uuid.UUID, state: str) -> None:
        self.session.execute(update(Audit).where(Audit.id == audit_id).values(callback_state=state)
                             .execution_options(synchronize_session=False))

    def mark_enqueued(self, audit_id: uuid.UUID) -> None:
        self.session.execute(update(Audit).where(Audit.id == audit_id).values(enqueued_at=utcnow())
                             .execution_options(synchronize_session=False))

    def end_images(self, audit_id: uuid.UUID) -> list[str]:
        """Retention at the end of an audit: its images are no longer kept (the rows, which say
        what was audited, stay). Returns the SHA-256s to collect."""
        self.session.execute(update(Audit).where(Audit.id == audit_id).values(images_deleted=True)
                             .execution_options(synchronize_session=False))
        return sorted(set(self.session.scalars(select(AuditImage.sha256).where(AuditImage.audit_id == audit_id))))

    def remove(self, audit: Audit) -> list[str]:
        """Delete the audit's row and everything under it; returns the SHA-256s to collect."""
        shas = set(self.session.scalars(select(AuditImage.sha256).where(AuditImage.audit_id == audit.id)))
        if audit.report_pdf_sha256:
            shas.add(audit.report_pdf_sha256)
        self.session.delete(audit)
        self.session.flush()
        return sorted(shas)

    def erase(self, audit: Audit) -> tuple[dict[str, int], list[str]]:
        """Delete what the audit stored, keeping its row as a deleted tombstone.

        Removes its image rows, report, PDF reference and runs, and the cached features of its
        images: in the tenant's own cache, unless another audit of the same tenant (not deleted)
        has the image; in the shared cache, unless any audit has it. Returns the counts of what was removed and the
        SHA-256s of the blobs to collect.
        """
        shas = set(self.session.scalars(select(AuditImage.sha256).where(AuditImage.audit_id == audit.id)))
        n_images = int(self.session.scalar(
            select(func.count()).select_from(AuditImage).where(AuditImage.audit_id == audit.id)) or 0)
        self.session.execute(delete(AuditImage).where(AuditImage.audit_id == audit.id)
                             .execution_options(synchronize_session=False))
        self.session.execute(delete(AuditShard).where(AuditShard.audit_id == audit.id)
                             .execution_options(synchronize_session=False))
        n_runs = self.session.execute(delete(AuditRun).where(AuditRun.audit_id == audit.id)
                                      .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
        n_features = 0
        ordered = sorted(shas)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start:start + 500]
            # The tenant's own cache: its rows of these images go, unless another of the same
            # tenant's audits (not deleted) has the image.
            mine = (select(AuditImage.sha256).join(Audit, Audit.id == AuditImage.audit_id)
                    .where(AuditImage.sha256 == FeatureRow.sha256, Audit.tenant_id == audit.tenant_id,
                           Audit.id != audit.id, Audit.deleted_at.is_(None)))
            n_features += int(self.session.execute(
                delete(FeatureRow).where(FeatureRow.tenant_id == audit.tenant_id, FeatureRow.sha256.in_(chunk),
                                         ~mine.exists())
                .execution_options(synchronize_session=False)).rowcount or 0)  # type: ignore[attr-defined]
            # The shared cache (CDI_FEATURE_CACHE_SCOPE=shared): a row stays while any audit has the image.
            anyone = select(AuditImage.sha256).where(AuditImage.sha256 == FeatureRow.sha256)
            n_features += int(self.session.execute(
                delete(FeatureRow).where(FeatureRow.tenant_id.is_(None), FeatureRow.sha256.in_(chunk),
                                         ~anyone.exists())
                .execution_options(synchronize_session=False)).rowcount or 0)  # type: ignore[attr-defined]
        had_report = audit.report is not None
        pdf = audit.report_pdf_sha256
        if pdf:
            shas.add(pdf)
        now = utcnow()
        self.session.execute(
            update(Audit).where(Audit.id == audit.id)
            .values(report=null(), report_pdf_sha256=None, images_deleted=True, deleted_at=now, updated_at=now)
            .execution_options(synchronize_session=False))
        self.session.flush()
        removed = {"images": n_images, "report": int(had_report), "pdf": int(pdf is not None),
                   "runs": int(n_runs or 0), "features": n_features}
        return removed, sorted(shas)

    # --- runs ---------------------------------------------------------------------------

    def start_run(self, audit_id: uuid.UUID, attempt: int, worker: str, shard: int | None = None) -> AuditRun:
        # Earlier attempts (at the whole audit, or at this shard) that never recorded an outcome
        # died with their worker. Other shards' attempts may be running on other workers.
        same = AuditRun.shard.is_(None) if shard is None else AuditRun.shard == shard
        self.session.execute(
            update(AuditRun).where(AuditRun.audit_id == audit_id, AuditRun.attempt < attempt,
                                   AuditRun.outcome.is_(None), same)
            .values(outcome="crashed", finished_at=utcnow()).execution_options(synchronize_session=False))
        run = self.session.get(AuditRun, (audit_id, attempt))
        if run is None:
            run = AuditRun(audit_id=audit_id, attempt=attempt, worker=worker, shard=shard)
            self.session.add(run)
        self.session.flush()
        return run

    def next_attempt(self, audit_id: uuid.UUID) -> int | None:
        """A new attempt number for a shard's run (None if the audit is gone or final)."""
        value = self.session.scalar(
            update(Audit).where(Audit.id == audit_id, Audit.state.not_in(TERMINAL_STATES))
            .values(attempts=Audit.attempts + 1).returning(Audit.attempts)
            .execution_options(synchronize_session=False))
        return None if value is None else int(value)

    def update_run(self, audit_id: uuid.UUID, attempt: int, **values: Any) -> None:
        self.session.execute(update(AuditRun).where(AuditRun.audit_id == audit_id, AuditRun.attempt == attempt)
                             .values(**values).execution_options(synchronize_session=False))


#: The audit's lease owner while its shards run: any shard's heartbeat renews it.
SHARDS_OWNER = "shards"


class ShardRepository:
    """An audit's shards: their creation, leases, progress and completion."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def all(self, audit_id: uuid.UUID) -> list[AuditShard]:
        return list(self.session.scalars(
            select(AuditShard).where(AuditShard.audit_id == audit_id).order_by(AuditShard.shard)))

    def get(self, audit_id: uuid.UUID, shard: int) -> AuditShard | None:
        return self.session.get(AuditShard, (audit_id, shard))

    def ensure(self, audit_id: uuid.UUID, n_images: int, shard_size: int, passes: int) -> list[AuditShard]:
        """The audit's shards, created on first call (later calls keep the first split, even if
        the configured size changed since)."""
        existing = self.all(audit_id)
        if existing:
            return existing
        for i, first in enumerate(range(0, n_images, shard_size)):
            count = min(shard_size, n_images - first)
            self.session.add(AuditShard(audit_id=audit_id, shard=i, first=first, count=count, state="pending",
                                        attempts=0, progress_done=0, progress_total=passes * count))
        self.session.flush()
        return self.all(audit_id)

    def hand_to_shards(self, audit_id: uuid.UUID, owner: str, lease: timedelta) -> bool:
        """Move the audit's lease from ``owner`` (the worker that split it) to its shards."""
        now = utcnow()
        done, total = self._progress(audit_id)
        result = self.session.execute(
            update(Audit).where(Audit.id == audit_id, Audit.lease_owner == owner, Audit.state.not_in(TERMINAL_STATES))
            .values(lease_owner=SHARDS_OWNER, lease_expires_at=now + lease, state=AuditState.EXTRACTING.value,
                    progress_stage="extracting", progress_done=done, progress_total=total, updated_at=now)
            .execution_options(synchronize_session=False))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def claim(self, audit_id: uuid.UUID, shard: int, owner: str, lease: timedelta) -> bool:
        """Take a pending shard unless another live worker holds it."""
        now = utcnow()
        result = self.session.execute(
            update(AuditShard)
            .where(AuditShard.audit_id == audit_id, AuditShard.shard == shard, AuditShard.state == "pending",
                   or_(AuditShard.lease_owner.is_(None), AuditShard.lease_expires_at < now,
                       AuditShard.lease_owner == owner))
            .values(lease_owner=owner, lease_expires_at=now + lease, attempts=AuditShard.attempts + 1)
            .execution_options(synchronize_session=False))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def heartbeat(self, audit_id: uuid.UUID, shard: int, owner: str, lease: timedelta, done: int,
                  total: int) -> str | None:
        """Renew the shard's lease (and the audit's, while its shards hold it), record progress.

        Returns the audit's state, or None if the audit is gone or another worker took the shard."""
        now = utcnow()
        result = self.session.execute(
            update(AuditShard)
            .where(AuditShard.audit_id == audit_id, AuditShard.shard == shard, AuditShard.lease_owner == owner,
                   AuditShard.state == "pending")
            .values(lease_expires_at=now + lease, progress_done=done, progress_total=total)
            .execution_options(synchronize_session=False))
        held = bool(result.rowcount)  # type: ignore[attr-defined]
        sums = self._progress(audit_id)
        self.session.execute(
            update(Audit).where(Audit.id == audit_id, Audit.lease_owner == SHARDS_OWNER,
                                Audit.state.not_in(TERMINAL_STATES))
            .values(lease_expires_at=now + lease, progress_done=sums[0], progress_total=sums[1], updated_at=now)
            .execution_options(synchronize_session=False))
        state = self.session.scalar(select(Audit.state).where(Audit.id == audit_id))
        if state is None or (not held and state != AuditState.CANCELLED.value):
            return None
        return str(state)

    def release(self, audit_id: uuid.UUID, shard: int, owner: str) -> None:
        self.session.execute(
            update(AuditShard).where(AuditShard.audit_id == audit_id, AuditShard.shard == shard,
                                     AuditShard.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None).execution_options(synchronize_session=False))

    def complete(self, audit_id: uuid.UUID, shard: int, owner: str) -> tuple[bool, bool]:
        """Mark the shard done; returns (whether this call did, whether every shard is done now).

        The audit's row is locked first, so that of two shards finishing at once exactly the
        later one sees all shards done. When all are, the shards' lease on the audit is made
        to run out at once: the final step (or the reconciler, if that step is never sent)
        takes the audit over."""
        self.session.execute(select(Audit.id).where(Audit.id == audit_id).with_for_update())
        now = utcnow()
        result = self.session.execute(
            update(AuditShard)
            .where(AuditShard.audit_id == audit_id, AuditShard.shard == shard, AuditShard.lease_owner == owner,
                   AuditShard.state == "pending")
            .values(state="done", lease_owner=None, lease_expires_at=None, finished_at=now,
                    progress_done=AuditShard.progress_total)
            .execution_options(synchronize_session=False))
        marked = bool(result.rowcount)  # type: ignore[attr-defined]
        complete = self.all_done(audit_id)
        done, total = self._progress(audit_id)
        values: dict[str, Any] = {"progress_done": done, "progress_total": total, "updated_at": now}
        if complete:
            values["lease_expires_at"] = now
        self.session.execute(
            update(Audit).where(Audit.id == audit_id, Audit.lease_owner == SHARDS_OWNER,
                                Audit.state.not_in(TERMINAL_STATES))
            .values(**values).execution_options(synchronize_session=False))
        return marked, complete

    def orphans(self, audit_id: uuid.UUID) -> list[int]:
        """Pending shards whose worker's lease ran out (it died): released, so that the caller
        sends their tasks again. Each orphan is returned to one caller only."""
        now = utcnow()
        rows = self.session.scalars(
            update(AuditShard)
            .where(AuditShard.audit_id == audit_id, AuditShard.state == "pending",
                   AuditShard.lease_owner.is_not(None), AuditShard.lease_expires_at < now)
            .values(lease_owner=None, lease_expires_at=None).returning(AuditShard.shard)
            .execution_options(synchronize_session=False))
        return sorted(int(r) for r in rows)

    def all_done(self, audit_id: uuid.UUID) -> bool:
        pending = self.session.scalar(select(func.count()).select_from(AuditShard).where(
            AuditShard.audit_id == audit_id, AuditShard.state != "done"))
        return not pending

    def _progress(self, audit_id: uuid.UUID) -> tuple[int, int]:
        row = self.session.execute(
            select(func.coalesce(func.sum(AuditShard.progress_done), 0),
                   func.coalesce(func.sum(AuditShard.progress_total), 0))
            .where(AuditShard.audit_id == audit_id)).one()
        return int(row[0]), int(row[1])


def hash_cache_key(key: str, tenant_id: uuid.UUID | None = None) -> str:
    """The stored key of the library's ``key``: scoped to ``tenant_id`` (None: the shared cache)."""
    scoped = key if tenant_id is None else f"tenant:{tenant_id}\n{key}"
    return hashlib.sha256(scoped.encode("utf-8")).hexdigest()


class FeatureRepository:
    """Per-image feature vectors keyed by (the library's cache key, image SHA-256), in the cache
    of one tenant (``tenant_id``) or, with None, in the cache shared by all."""

    def __init__(self, session: Session, tenant_id: uuid.UUID | None = None) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def load(self, key: str, sha256s: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = sorted(set(sha256s))
        out: dict[str, np.ndarray] = {}
        hashed = hash_cache_key(key, self.tenant_id)
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            for row in self.session.scalars(
                select(FeatureRow).where(FeatureRow.cache_key == hashed, FeatureRow.sha256.in_(chunk))
            ):
                shape = tuple(int(s) for s in row.shape.split(",") if s)
                out[row.sha256] = np.frombuffer(row.data, dtype=np.dtype(row.dtype)).reshape(shape).copy()
        return out

    def save(self, key: str, rows: Mapping[str, np.ndarray]) -> None:
        """Store the rows; a row may be partial (NaN where a feature was not computed).

        A row stored already is completed, never overwritten: its values stay, and the new
        row fills only its NaN entries (a later audit that needed more features adds them).
        """
        if not rows:
            return
        hashed = hash_cache_key(key, self.tenant_id)
        stored = self.load(key, rows.keys())
        values = []
        for sha, vec in rows.items():
            arr = np.ascontiguousarray(vec)
            old = stored.get(sha)
            if old is not None and old.shape == arr.shape:
                if not np.isnan(old).any():
                    continue
                arr = np.ascontiguousarray(np.where(np.isnan(old), arr, old).astype(arr.dtype))
            values.append({"cache_key": hashed, "sha256": sha, "dtype": arr.dtype.str,
                           "shape": ",".join(str(s) for s in arr.shape), "data": arr.tobytes(),
                           "created_at": utcnow(), "tenant_id": self.tenant_id})
        if not values:
            return
        dialect = self.session.get_bind().dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            insert: Any = pg_insert(FeatureRow)
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            insert = sqlite_insert(FeatureRow)
        else:  # pragma: no cover - only Postgres and SQLite are supported
            raise RuntimeError(f"unsupported database {dialect}")
        stmt = insert.on_conflict_do_update(
            index_elements=["cache_key", "sha256"],
            set_={"dtype": insert.excluded.dtype, "shape": insert.excluded.shape, "data": insert.excluded.data},
        )
        self.session.execute(stmt, values)

    def count(self, key: str | None = None) -> int:
        q = select(func.count()).select_from(FeatureRow)
        if key is not None:
            q = q.where(FeatureRow.cache_key == hash_cache_key(key, self.tenant_id))
        return int(self.session.scalar(q) or 0)


__all__ = [
    "RUNNING_STATES",
    "ApiKeyRepository",
    "AuditRepository",
    "FeatureRepository",
    "InvalidCursor",
    "ModelRepository",
    "Page",
    "ShardRepository",
    "TenantRepository",
]
