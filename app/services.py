"""What the API does, below HTTP: submit, cancel and delete audits.

Each public method is one unit of work: it commits its own transaction, so routes never
write SQL or commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session

from app import errors as E
from app.api.multipart import ParsedForm
from app.errors import BadInput, Unavailable
from app.queue import AuditQueue
from app.registry import ModelRegistry
from app.settings import Settings
from app.storage.blobs import BlobStore
from app.storage.models import Audit
from app.storage.repositories import AuditRepository
from app.uploads import parse_options, stage_upload

log = logging.getLogger(__name__)

ARCHIVE_FIELDS = frozenset({"archive", "published", "unpublished"})
FILE_FIELDS = ARCHIVE_FIELDS | {"captions", "labels"}
TEXT_FIELDS = frozenset({"model", "reference_model", "alpha", "protocol", "features", "seed", "callback_url"})


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

    def submit(self, tenant_id: uuid.UUID, form: ParsedForm) -> Audit:
        """Validate an upload completely, store it, queue the audit. Nothing is stored on error."""
        options, callback_url = parse_options(form.fields)
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
        except BaseException:
            staged.cleanup()
            raise
        try:
            for im in staged.images:
                self.blobs.put_file(im.path, im.sha256)
        except BaseException:
            staged.cleanup()
            raise
        rows = [
            (im.role, im.name, im.sha256, im.size,
             (staged.captions or {}).get(im.name), (staged.labels or {}).get(im.name))
            for im in staged.images
        ]
        with self.session_factory() as session:
            repo = AuditRepository(session)
            audit = repo.create(tenant_id=tenant_id, model_id=model.id, model_source=model.source,
                                model_revision=model.revision, options=stored_options,
                                callback_url=callback_url, images=rows)
            session.commit()
            try:
                self.queue.enqueue(audit.id)
            except Exception as exc:
                log.exception("could not queue audit %s", audit.id)
                orphaned = repo.delete_images(audit)
                session.delete(audit)
                session.commit()
                for sha in orphaned:
                    self.blobs.delete(sha)
                raise Unavailable(f"the work queue cannot be reached ({type(exc).__name__}); nothing was "
                                  "stored, try again later", "queue_unavailable") from None
            log.info("audit queued", extra={"audit_id": str(audit.id), "tenant_id": str(tenant_id),
                                            "model": model.id, "images": len(rows)})
            return audit

    def delete(self, session: Session, audit: Audit) -> Audit:
        """Cancel the audit if it has not ended, and delete its uploaded images."""
        repo = AuditRepository(session)
        cancelled = repo.cancel(audit)
        orphaned = repo.delete_images(audit)
        session.commit()
        for sha in orphaned:
            self.blobs.delete(sha)
        if cancelled and audit.callback_url:
            try:
                self.queue.enqueue_callback(audit.id)
            except Exception:  # the cancellation stands; the callback is best effort here
                log.exception("could not queue the callback of cancelled audit %s", audit.id)
        session.refresh(audit)
        return audit
