"""When a blob may be deleted: the blob ledger.

Blobs are content-addressed and shared: two tenants who upload the same image store one
blob. Deleting one audit must therefore never delete a blob that another audit, or an upload
that has not committed yet, still needs. The rule, in the database only (so it holds the same
whether blobs live in a local folder or an object store, and needs no listing of either):

1. A writer first **claims** the blobs it is about to store, in its own committed transaction:
   it upserts each blob's row in ``blobs`` (taking the row's lock) and adds a row to
   ``blob_claims`` that lives for ``claim_ttl``. Only then does it write the blobs.
2. The writer then writes its **references** (``audit_images`` rows, an audit's
   ``report_pdf_sha256``) and removes its claims in one transaction. If its claims were
   collected in the meantime (it took longer than ``claim_ttl``), it refuses to commit.
3. A collector deletes a blob only while holding the lock of its ``blobs`` row, after
   checking, in a statement that runs after the lock was granted, that no reference and no
   live claim exists. It deletes the blob from the store first and the row last, in the same
   transaction, so a writer that waits on the row lock stores its copy after the deletion.

References are ``audit_images`` rows of audits whose images are not deleted, and report PDFs.
Everything here goes through :class:`app.storage.blobs.BlobStore`'s ``delete``; nothing
depends on how the store keeps its blobs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.storage.blobs import BlobStore
from app.storage.models import Audit, AuditImage, Blob, BlobClaim, utcnow

log = logging.getLogger(__name__)

#: Rows per statement: within every backend's limit on bound parameters.
_CHUNK = 500


class ClaimLost(RuntimeError):
    """A writer's claims expired and were collected before it wrote its references."""


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def _upsert_blobs(session: Session, sizes: Mapping[str, int]) -> None:
    """Insert or touch the blobs' rows, in SHA-256 order (two writers never deadlock)."""
    dialect = session.get_bind().dialect.name
    now = utcnow()
    shas = sorted(sizes)
    for chunk in _chunks(shas):
        values = [{"sha256": s, "size": int(sizes[s]), "created_at": now} for s in chunk]
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(Blob).values(values)
            # DO UPDATE (not DO NOTHING): it waits for, and then holds, the row's lock.
            session.execute(stmt.on_conflict_do_update(index_elements=["sha256"],
                                                       set_={"size": stmt.excluded.size}))
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            sstmt = sqlite_insert(Blob).values(values)
            session.execute(sstmt.on_conflict_do_update(index_elements=["sha256"],
                                                        set_={"size": sstmt.excluded.size}))
        else:  # pragma: no cover - only Postgres and SQLite are supported
            raise RuntimeError(f"unsupported database {dialect}")


def claim(session: Session, claim_id: uuid.UUID, sizes: Mapping[str, int], ttl: timedelta) -> None:
    """Claim the blobs ``sizes`` (SHA-256 → bytes) for ``claim_id``; the caller commits, then writes."""
    if not sizes:
        return
    _upsert_blobs(session, sizes)
    expires = utcnow() + ttl
    session.add_all(BlobClaim(claim_id=claim_id, sha256=s, expires_at=expires) for s in sorted(sizes))
    session.flush()


def release(session: Session, claim_id: uuid.UUID, expected: int) -> None:
    """Remove ``claim_id``'s claims, inside the transaction that writes the references.

    Raises :class:`ClaimLost` if fewer than ``expected`` live claims are left: a collector
    may have deleted those blobs, so the references must not be committed.
    """
    now = utcnow()
    result = session.execute(
        delete(BlobClaim).where(BlobClaim.claim_id == claim_id, BlobClaim.expires_at > now)
        .execution_options(synchronize_session=False))
    removed = int(result.rowcount or 0)  # type: ignore[attr-defined]
    session.execute(delete(BlobClaim).where(BlobClaim.claim_id == claim_id)
                    .execution_options(synchronize_session=False))
    if removed < expected:
        raise ClaimLost(f"{expected - removed} of {expected} claimed blobs expired before they were referenced")


def _lock(session: Session, shas: list[str]) -> list[str]:
    """Lock the rows of ``shas`` (those that exist), in order; returns their SHA-256s."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        # SQLite has no row locks: a write takes the database's write lock for the transaction.
        session.execute(update(Blob).where(Blob.sha256.in_(shas)).values(size=Blob.size)
                        .execution_options(synchronize_session=False))
        return list(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas)).order_by(Blob.sha256)))
    return list(session.scalars(
        select(Blob.sha256).where(Blob.sha256.in_(shas)).order_by(Blob.sha256).with_for_update()))


def _in_use(session: Session, shas: list[str]) -> set[str]:
    """Of ``shas``, those referenced by an audit or claimed by a live writer (one statement)."""
    now = utcnow()
    images = (select(AuditImage.sha256).join(Audit, Audit.id == AuditImage.audit_id)
              .where(AuditImage.sha256.in_(shas), Audit.images_deleted.is_(False)))
    pdfs = select(Audit.report_pdf_sha256).where(Audit.report_pdf_sha256.in_(shas))
    claims = select(BlobClaim.sha256).where(BlobClaim.sha256.in_(shas), BlobClaim.expires_at > now)
    return {s for s in session.scalars(images.union(pdfs, claims)) if s is not None}


class BlobLedger:
    """Claims, references and collection of blobs (see the module's docstring).

    ``session_factory`` gives sessions on the service's database; every method here runs its
    own transactions.
    """

    def __init__(self, session_factory: Callable[[], Session], blobs: BlobStore,
                 claim_ttl: timedelta = timedelta(hours=1)) -> None:
        self.session_factory = session_factory
        self.blobs = blobs
        self.claim_ttl = claim_ttl

    def claim(self, sizes: Mapping[str, int]) -> uuid.UUID:
        """Claim blobs before writing them; returns the claim's id (committed)."""
        claim_id = uuid.uuid4()
        with self.session_factory() as session:
            claim(session, claim_id, sizes, self.claim_ttl)
            session.commit()
        return claim_id

    def abandon(self, claim_id: uuid.UUID, shas: Iterable[str]) -> list[str]:
        """Drop a claim whose writer gave up, and delete what nothing else uses."""
        with self.session_factory() as session:
            session.execute(delete(BlobClaim).where(BlobClaim.claim_id == claim_id)
                            .execution_options(synchronize_session=False))
            session.commit()
        return self.collect(shas)

    def collect(self, shas: Iterable[str]) -> list[str]:
        """Delete those of ``shas`` that nothing references or claims; returns the deleted ones."""
        wanted = sorted(set(shas))
        deleted: list[str] = []
        for chunk in _chunks(wanted):
            with self.session_factory() as session:
                locked = _lock(session, chunk)
                if not locked:
                    session.rollback()
                    continue
                unused = sorted(set(locked) - _in_use(session, locked))
                for sha in unused:
                    # The store first: if this fails, the row stays and a later sweep retries.
                    self.blobs.delete(sha)
                if unused:
                    session.execute(delete(Blob).where(Blob.sha256.in_(unused))
                                    .execution_options(synchronize_session=False))
                session.commit()
                deleted.extend(unused)
        return deleted

    def sweep(self, limit: int = 10_000) -> list[str]:
        """Collect every unused blob (expired claims included): the periodic mark-and-sweep."""
        now = utcnow()
        with self.session_factory() as session:
            session.execute(delete(BlobClaim).where(BlobClaim.expires_at <= now)
                            .execution_options(synchronize_session=False))
            session.commit()
            referenced_images = (select(AuditImage.sha256).join(Audit, Audit.id == AuditImage.audit_id)
                                 .where(AuditImage.sha256 == Blob.sha256, Audit.images_deleted.is_(False)))
            referenced_pdfs = select(Audit.id).where(Audit.report_pdf_sha256 == Blob.sha256)
            claimed = select(BlobClaim.sha256).where(BlobClaim.sha256 == Blob.sha256)
            candidates = list(session.scalars(
                select(Blob.sha256).where(~referenced_images.exists(), ~referenced_pdfs.exists(),
                                          ~claimed.exists()).limit(limit)))
        deleted = self.collect(candidates)
        if deleted:
            log.info("blobs collected", extra={"blobs": len(deleted)})
        return deleted


__all__ = ["BlobLedger", "ClaimLost", "claim", "release"]
