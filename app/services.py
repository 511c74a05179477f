"""What the API does, below HTTP: submit, cancel and delete audits.

Each public method is one unit of work: it commits its own transaction, so routes never
write SQL or commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app import errors as E
from app.api.multipart import ParsedForm
from app.callbacks import AllowList, check_url
from app.errors import BadInput, Unavailable
from app.forms import AuditOptionsForm
from app.queue import AuditQueue
from app.quotas import Quotas
from app.registry import ModelRegistry
from app.settings import Settings
from app.storage.blobs import BlobStore
from app.storage.ledger import BlobLedger, ClaimLost, release
from app.storage.models import Audit
from app.storage.repositories import AuditRepository, TenantRepository
from app.uploads import StagedUpload, check_text_fields, parse_options, parse_retention, stage_upload

log = logging.getLogger(__name__)

ARCHIVE_FIELDS = frozenset({"archive", "published", "unpublished"})
FILE_FIELDS = ARCHIVE_FIELDS | {"captions", "labels"}
TEXT_FIELDS = frozenset({"model", "reference_model", "retain_images", *AuditOptionsForm.model_fields})


def check_conditioning(conditioning: str | None, has_labels: bool) -> None:
    """The library's rule on labels, checked before anything is queued (method §3)."""
    if conditioning == "class" and not has_labels:
        raise BadInput("the model is class-conditional: send a labels file with a class for every image",
                       E.MALFORMED_LABELS)
    if conditioning not in (None, "class") and has_labels:
        raise BadInput(f"labels were sent, but the model is not class-conditional ({conditioning})",
                       E.MALFORMED_LABELS)


class AuditService:
    def __init__(self, session_factory: Callable[[], Session], settings: Settings, blobs: BlobStore,
                 queue: AuditQueue) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.blobs = blobs
        self.queue = queue
        self.ledger = BlobLedger(session_factory, blobs, timedelta(seconds=settings.blob_claim_seconds))
        self.quotas = Quotas(session_factory, settings)

    def submit(self, tenant_id: uuid.UUID, form: ParsedForm) -> Audit:
        """Validate an upload completely, store it, queue the audit. Nothing is stored on error."""
        check_text_fields(form.fields)
        options, callback_url = parse_options(form.fields)
        if callback_url is not None:
            check_url(callback_url, AllowList.parse(self.settings.callback_allow))
        retain = parse_retention(form.fields, self.settings)
        self.quotas.check_submit(tenant_id)
        model_id = form.fields.get("model", "").strip()
        if not model_id:
            raise BadInput("the form field 'model' is required (a model id from GET /v1/models)",
                           E.INVALID_OPTIONS)
        archives = {name: f.path for name, f in form.files.items() if name in ARCHIVE_FIELDS}
        if not archives:
            raise BadInput("no images: send one zip as 'archive', or two as 'published' and 'unpublished'",
                           E.MALFORMED_UPLOAD)
        with self.session_factory() as session:
            registry = ModelRegistry(session, self.settings)
            model = registry.resolve(model_id)
            reference_id = form.fields.get("reference_model", "").strip()
            reference = registry.resolve(reference_id) if reference_id else None
        if reference is not None and reference.conditioning != model.conditioning:
            raise BadInput(f"reference model {reference.id!r} is {reference.conditioning}-conditioned, "
                           f"model {model.id!r} {model.conditioning}-conditioned: a reference must take the "
                           "same inputs", E.INVALID_OPTIONS)
        stored_options = options.to_dict()
        if reference is not None:
            # The reference travels with the options: the worker loads it, and calibrates (§10.2).
            stored_options["reference_model"] = {"id": reference.id, "source": reference.source,
                                                 "revision": reference.revision}
        captions = labels = None
        if "captions" in form.files:
            f = form.files["captions"]
            captions = (f.path.read_bytes(), f.filename)
        if "labels" in form.files:
            f = form.files["labels"]
            labels = (f.path.read_bytes(), f.filename)

        staged = stage_upload(archives, self.settings, protocol=options.protocol, captions=captions,
                              labels=labels)
        try:
            check_conditioning(model.conditioning, staged.labels is not None)
            self.quotas.check_upload(tenant_id, len(staged.images), staged.total_bytes)
            rows = [
                (im.role, im.name, im.sha256, im.size,
                 (staged.captions or {}).get(im.name), (staged.labels or {}).get(im.name))
                for im in staged.images
            ]
            audit = self._store(tenant_id, staged, rows, model_id=model.id, model_source=model.source,
                                model_revision=model.revision, options=stored_options,
                                callback_url=callback_url, retain_images=retain)
        finally:
            staged.cleanup()
        self._send(audit)
        log.info("audit queued", extra={"audit_id": str(audit.id), "tenant_id": str(tenant_id),
                                        "model": model.id, "images": len(rows)})
        return audit

    def _store(self, tenant_id: uuid.UUID, staged: StagedUpload,
               rows: list[tuple[str, str, str, int, str | None, int | None]], **audit: Any) -> Audit:
        """Store the staged images and commit the audit that references them (app.storage.ledger).

        The blobs are claimed (committed) before they are written, and the claim is released in
        the transaction that writes the audit's image rows: a concurrent DELETE of another audit
        using the same images never deletes them. On error, nothing stays behind.
        """
        sizes = {im.sha256: im.size for im in staged.images}
        claim_id = self.ledger.claim(sizes)
        try:
            for im in staged.images:
                self.blobs.put_file(im.path, im.sha256)
            with self.session_factory() as session:
                if audit.get("callback_url"):
                    TenantRepository(session).webhook_secret(tenant_id)  # what the callbacks are signed with
                created = AuditRepository(session).create(tenant_id=tenant_id, images=rows, **audit)
                release(session, claim_id, len(sizes))
                session.commit()
                return created
        except ClaimLost:
            self.ledger.abandon(claim_id, sizes)
            raise Unavailable("storing the upload took longer than the blobs' claim lasts "
                              "(CDI_BLOB_CLAIM_SECONDS); nothing was stored, try again", "upload_expired") from None
        except BaseException:
            self.ledger.abandon(claim_id, sizes)
            raise

    def _send(self, audit: Audit) -> None:
        """Hand the committed audit to the broker, then mark it sent.

        An API that dies between the commit and the send leaves ``enqueued_at`` unset: the
        reconciler sends it then (the audit row is the outbox).
        """
        try:
            self.queue.enqueue(audit.id)
        except Exception as exc:
            log.exception("could not queue audit %s", audit.id)
            with self.session_factory() as session:
                repo = AuditRepository(session)
                row = repo.get(audit.id)
                shas = repo.remove(row) if row is not None else []
                session.commit()
            self.ledger.collect(shas)
            raise Unavailable(f"the work queue cannot be reached ({type(exc).__name__}); nothing was "
                              "stored, try again later", "queue_unavailable") from None
        with self.session_factory() as session:
            AuditRepository(session).mark_enqueued(audit.id)
            session.commit()

    def delete(self, session: Session, audit: Audit) -> tuple[Audit, dict[str, int]]:
        """Cancel the audit if it has not ended, and delete everything it stored.

        Removes its images (the blobs no other audit uses), report, PDF, runs, and the cached
        features of its images that no other audit needs. The audit's row stays, marked
        deleted, so that its id keeps answering. Returns the audit and what was removed.
        """
        repo = AuditRepository(session)
        cancelled = repo.cancel(audit)
        removed, shas = repo.erase(audit)
        if cancelled and audit.callback_url:
            repo.set_callback_state(audit.id, "pending")  # the reconciler resends it if the send below fails
        session.commit()
        removed["blobs"] = len(self.ledger.collect(shas))
        if cancelled and audit.callback_url:
            try:
                self.queue.enqueue_callback(audit.id)
            except Exception:  # the cancellation stands; the reconciler sends the callback
                log.exception("could not queue the callback of cancelled audit %s", audit.id)
        session.refresh(audit)
        return audit, removed
