"""Running one audit: the worker's whole job, independent of Celery.

:meth:`AuditRunner.run` takes an audit id and

1. claims the audit with a lease (a second delivery of the same task finds it held, or
   finished, and does nothing);
2. reads the images from the blob store and the model from the per-process cache;
3. calls :func:`cdi.audit.audit` with a progress callback and a database-backed
   :class:`DatabaseFeatureStore`, so that every batch's features are stored as soon as they
   exist and a new attempt after a crash computes only what is missing;
4. renews the lease from a heartbeat thread, writing progress and noticing cancellation;
5. stores the report (the library's sealed ``cdi-report`` document, signed when
   ``CDI_SIGNING_KEY`` names a key) and its PDF, or the failure's stable code and message.

It never raises for a problem with the audit itself (bad images, unsupported model...):
those are recorded as a failed audit. It raises only for transient infrastructure errors
(database unreachable), which the task retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

import numpy as np
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.pdf import render_report_pdf
from app.settings import Settings
from app.storage.blobs import BlobNotFound, BlobStore
from app.storage.ledger import BlobLedger, release
from app.storage.models import AuditState
from app.storage.repositories import AuditRepository, FeatureRepository, ModelRepository, ShardRepository
from cdi.report import result_to_dict, seal_document, signing_key_from_env

if TYPE_CHECKING:
    from cdi.audit import AuditOptions, AuditResult
    from cdi.images import ImageFile
    from cdi.models.base import DiffusionAdapter

log = logging.getLogger(__name__)

Outcome = Literal["done", "failed", "cancelled", "busy", "skipped", "lost", "missing", "dispatched"]

#: The library's progress stages → the audit's state.
STAGE_STATE: dict[str, AuditState] = {
    "validating": AuditState.VALIDATING,
    "extracting": AuditState.EXTRACTING,
    "scoring": AuditState.SCORING,
    "testing": AuditState.SCORING,
}


class AuditStopped(Exception):
    """Raised inside the library's callbacks to stop an audit that was cancelled or taken over."""

    def __init__(self, reason: Literal["cancelled", "lost"]) -> None:
        super().__init__(reason)
        self.reason = reason


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class BlobImages(Sequence["ImageFile"]):
    """The audit's images of one set, read from the blob store when accessed (not all in memory)."""

    def __init__(self, blobs: BlobStore, rows: Sequence[tuple[str, str]]) -> None:
        self.blobs = blobs
        self.rows = list(rows)  # (name, sha256)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> ImageFile: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ImageFile]: ...

    def __getitem__(self, index: int | slice) -> ImageFile | Sequence[ImageFile]:
        if isinstance(index, slice):
            return BlobImages(self.blobs, self.rows[index])
        from cdi.images import ImageFile

        name, sha = self.rows[index]
        return ImageFile(name=name, data=self.blobs.read(sha))

    #: Reads in flight ahead of the consumer when iterating: an object store answers each
    #: image in a round trip, which would otherwise add up image by image.
    PREFETCH = 16

    def __iter__(self) -> Iterator[ImageFile]:
        if len(self.rows) <= 1 or not self.blobs.remote:  # a local file is read faster than a thread starts
            for i in range(len(self.rows)):
                yield self[i]
            return
        with ThreadPoolExecutor(max_workers=min(8, self.PREFETCH), thread_name_prefix="blob-read") as pool:
            ahead: deque[Future[ImageFile]] = deque()
            following = iter(range(len(self.rows)))
            try:
                for i in following:
                    ahead.append(pool.submit(self.__getitem__, i))
                    if len(ahead) >= self.PREFETCH:
                        break
                while ahead:
                    head = ahead.popleft()
                    i = next(following, -1)
                    if i >= 0:
                        ahead.append(pool.submit(self.__getitem__, i))
                    yield head.result()  # in order; a read's error (BlobNotFound) raises here
            finally:
                for f in ahead:
                    f.cancel()


@dataclass
class RunState:
    """What the main thread tells the heartbeat thread, and what it is told back."""

    state: AuditState = AuditState.VALIDATING
    stage: str | None = None
    done: int = 0
    total: int = 0
    stop: AuditStopped | None = None
    #: Set before the final write: from then on the lease is released on purpose.
    finishing: bool = False
    changed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        if self.stop is not None:
            raise self.stop


class DatabaseFeatureStore:
    """The library's ``FeatureStore`` over the ``features`` table, counting for the run record."""

    def __init__(self, session_factory: Callable[[], Session], audit_id: uuid.UUID, attempt: int,
                 run: RunState, *, shared: bool = False) -> None:
        self.session_factory = session_factory
        self.audit_id = audit_id
        self.attempt = attempt
        self.run = run
        self.reused = 0
        self.computed = 0
        #: Rows found stored: one the audit then completes (a partial row) counts as computed.
        self._loaded: set[str] = set()
        #: The cache shared by all tenants (``CDI_FEATURE_CACHE_SCOPE=shared``), or the audit's tenant's.
        self.shared = shared
        self._tenant: uuid.UUID | None = None

    def _features(self, session: Session) -> FeatureRepository:
        if self.shared:
            return FeatureRepository(session)
        if self._tenant is None:
            audit = AuditRepository(session).get(self.audit_id)
            if audit is None:
                raise AuditStopped("lost")
            self._tenant = audit.tenant_id
        return FeatureRepository(session, self._tenant)

    def load(self, key: str, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        with self.session_factory() as session:
            rows = self._features(session).load(key, sha256s)
            self._loaded.update(rows)
            self.reused += len(rows)
            AuditRepository(session).update_run(self.audit_id, self.attempt, features_reused=self.reused)
            session.commit()
        return rows

    def save(self, key: str, rows: Mapping[str, np.ndarray]) -> None:
        # Stored even when the audit was just cancelled: the features are valid and cached.
        with self.session_factory() as session:
            self._features(session).save(key, rows)
            self.computed += len(rows)
            completed = self._loaded.intersection(rows)
            self._loaded -= completed
            self.reused -= len(completed)
            AuditRepository(session).update_run(self.audit_id, self.attempt, features_computed=self.computed,
                                                features_reused=self.reused)
            session.commit()
        self.run.check()


ModelLoader = Callable[[str, "str | None", str], "DiffusionAdapter"]
#: :func:`cdi.audit.audit`'s signature (a test passes a stand-in).
AuditFunction = Callable[..., "AuditResult"]


class ShardQueue(Protocol):
    """Where a worker sends a sharded audit's tasks (:class:`app.queue.CeleryQueue`)."""

    def enqueue(self, audit_id: uuid.UUID) -> None: ...

    def enqueue_shard(self, audit_id: uuid.UUID, shard: int) -> None: ...


class ModelChanged(Exception):
    """The weights found on this worker are not those registered under the model's id."""


class AuditRunner:
    def __init__(self, settings: Settings, session_factory: Callable[[], Session], blobs: BlobStore,
                 load_model: ModelLoader, audit_fn: AuditFunction | None = None,
                 name: str | None = None, queue: ShardQueue | None = None) -> None:
        self.settings = settings
        #: Sends shard tasks and the final step; without one, audits are never split.
        self.queue = queue
        self.session_factory = session_factory
        self.blobs = blobs
        self.load_model = load_model
        self.audit_fn = audit_fn
        self.name = name or worker_name()
        self.ledger = BlobLedger(session_factory, blobs, timedelta(seconds=settings.blob_claim_seconds))

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_seconds)

    def run(self, audit_id: uuid.UUID) -> Outcome:
        owner = f"{self.name}:{uuid.uuid4().hex[:8]}"
        with self.session_factory() as session:
            repo = AuditRepository(session)
            audit = repo.get(audit_id)
            if audit is None:
                log.warning("audit %s does not exist (deleted?); nothing to do", audit_id)
                return "missing"
            if AuditState(audit.state).is_terminal:
                return "skipped"
            if not repo.claim(audit_id, owner, self.lease):
                session.rollback()
                return "busy"
            session.commit()
            session.refresh(audit)
            attempt = audit.attempts
            repo.start_run(audit_id, attempt, owner)
            pending = self._shards_to_run(session, audit, owner)
            if pending is not None:
                repo.update_run(audit_id, attempt, outcome="dispatched", finished_at=_now())
                session.commit()
                assert self.queue is not None
                for shard in pending:
                    self.queue.enqueue_shard(audit_id, shard)
                log.info("audit split into shards", extra={"audit_id": str(audit_id), "shards": pending})
                return "dispatched"
            repo.heartbeat(audit_id, owner, self.lease, state=AuditState.VALIDATING.value,
                           progress_stage="validating", progress_done=0,
                           progress_total=audit.n_published + audit.n_unpublished)
            session.commit()
            job = Job.read(session, audit, repo.images(audit_id))
        log.info("audit started", extra={"audit_id": str(audit_id), "attempt": attempt, "worker": owner})

        run = RunState(stage="validating", total=job.n_images)
        stop_heartbeat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(audit_id, owner, run, stop_heartbeat),
                                name=f"heartbeat-{audit_id}", daemon=True)
        beat.start()
        store = DatabaseFeatureStore(self.session_factory, audit_id, attempt, run,
                                     shared=self.settings.feature_cache_scope == "shared")
        try:
            outcome = self._execute(audit_id, owner, attempt, job, run, store)
        finally:
            stop_heartbeat.set()
            beat.join(timeout=10)
        log.info("audit ended", extra={"audit_id": str(audit_id), "attempt": attempt, "outcome": outcome,
                                       "features_computed": store.computed, "features_reused": store.reused})
        return outcome

    # --- the work -------------------------------------------------------------------------

    def _guarded(self, audit_id: uuid.UUID, attempt: int, run: RunState, what: str, work: Callable[[], Outcome],
                 release: Callable[[], None], fail: Callable[[str, str], Outcome]) -> Outcome:
        """The one error path of a whole audit's and a shard's ``work``.

        Stopped (cancelled, lease lost): the run is recorded so. The database unreachable:
        ``release`` gives the lease back, so that a retry (or another worker) can take it at
        once, and the error propagates for the task to retry; the features stored so far are
        kept. Any other error: a stable code and message (:func:`_classify`) go to ``fail``.
        """
        try:
            return work()
        except AuditStopped as stop:
            self._record_run(audit_id, attempt, stop.reason)
            return stop.reason
        except OperationalError:
            log.exception("database error in %s; it will be retried", what)
            with contextlib.suppress(OperationalError):
                release()
            raise
        except Exception as exc:
            if run.stop is not None:
                self._record_run(audit_id, attempt, run.stop.reason)
                return run.stop.reason
            code, message = _classify(exc)
            if code == "internal_error":
                log.exception("%s failed unexpectedly", what)
            run.finishing = True
            return fail(code, message)

    def _release(self, audit_id: uuid.UUID, owner: str) -> None:
        with self.session_factory() as session:
            AuditRepository(session).release(audit_id, owner)
            session.commit()

    def _execute(self, audit_id: uuid.UUID, owner: str, attempt: int, job: Job, run: RunState,
                 store: DatabaseFeatureStore) -> Outcome:
        return self._guarded(
            audit_id, attempt, run, f"audit {audit_id}",
            work=lambda: self._complete(audit_id, owner, attempt, job, run, store),
            release=lambda: self._release(audit_id, owner),
            fail=lambda code, message: self._fail(audit_id, owner, attempt, code, message))

    def _complete(self, audit_id: uuid.UUID, owner: str, attempt: int, job: Job, run: RunState,
                  store: DatabaseFeatureStore) -> Outcome:
        """Run the audit, store its report and PDF, finish it."""
        # Read before the work, so that a bad deployment key fails the audit at once.
        signing_key = signing_key_from_env()
        result = self._audit(job, run, store)
        run.check()
        report = _jsonable(result_to_dict(result))
        if signing_key is not None and report.get("schema_version") is not None:
            report = seal_document(report, signing_key)
        self._set_state(run, AuditState.REPORTING, "reporting")
        with self.session_factory() as session:
            audit = AuditRepository(session).get(audit_id)
            assert audit is not None
            meta = {"id": str(audit.id), "model": audit.model_id, "options": audit.options,
                    "n_published": audit.n_published, "n_unpublished": audit.n_unpublished}
        pdf = render_report_pdf(meta, report)
        pdf_sha = hashlib.sha256(pdf).hexdigest()
        # The PDF is claimed before it is stored and referenced in the transaction that
        # releases the claim (app.storage.ledger): a concurrent collection cannot lose it.
        claim_id = self.ledger.claim({pdf_sha: len(pdf)})
        self.blobs.put_bytes(pdf)
        forward, backward = _passes(result)
        run.finishing = True
        with self.session_factory() as session:
            repo = AuditRepository(session)
            finished = repo.finish(audit_id, owner, state=AuditState.DONE, report=report,
                                   verdict=str(report.get("verdict")), p_value=_float(report.get("p_value")),
                                   pdf_sha256=pdf_sha, progress_stage="reporting")
            release(session, claim_id, 1)
            repo.update_run(audit_id, attempt, outcome="done" if finished else "superseded",
                            finished_at=_now(), forward_passes=forward, backward_passes=backward)
            session.commit()
        if not finished:
            self.ledger.collect([pdf_sha])
            return self._stopped_outcome(audit_id)
        self.retire_images(audit_id)
        return "done"

    def _audit(self, job: Job, run: RunState, store: DatabaseFeatureStore) -> AuditResult:
        from cdi.audit import Progress

        audit_fn = self.audit_fn
        if audit_fn is None:
            from cdi import audit as audit_module

            audit_fn = audit_module.audit

        options, adapter, reference = self._prepare(job, run)

        def progress(p: Progress) -> None:
            state = STAGE_STATE.get(p.stage, run.state)
            with run.lock:
                changed = state != run.state or p.stage != run.stage
                run.state, run.stage, run.done, run.total = state, p.stage, int(p.done), int(p.total)
            if changed:
                run.changed.set()
            run.check()

        return audit_fn(
            BlobImages(self.blobs, job.published), BlobImages(self.blobs, job.unpublished), adapter,
            reference_model=reference, captions=job.captions or None, labels=job.labels or None,
            options=options, progress=progress, feature_store=store,
            # Reports name models by their registered ids, never by where a host keeps them.
            model_name=job.model.id, reference_name=job.reference.id if job.reference is not None else None,
        )

    def _prepare(self, job: Job, run: RunState) -> tuple[AuditOptions, DiffusionAdapter, DiffusionAdapter | None]:
        """The audit's options on this worker's device, and its model (and reference), loaded."""
        device = resolve_device(self.settings.worker_device)
        options = _options(job.options, device, self.settings.worker_batch_size)
        adapter, reference = self._models(job, device)
        run.check()
        return options, adapter, reference

    def _models(self, job: Job, device: str) -> tuple[DiffusionAdapter, DiffusionAdapter | None]:
        """The audit's model (and reference), checked against the weights registered for them."""
        adapter = self.load_model(job.model.source, job.model.revision, device)
        _check_weights(adapter, job.model.id, job.model.weights)
        if job.reference is None:
            return adapter, None
        reference = self.load_model(job.reference.source, job.reference.revision, device)
        _check_weights(reference, job.reference.id, job.reference.weights)
        return adapter, reference

    # --- sharded audits -------------------------------------------------------------------

    def _shards_to_run(self, session: Session, audit: Any, owner: str) -> list[int] | None:
        """For an audit to split (more images than ``CDI_SHARD_SIZE``, and a queue to send shards
        to) whose shards are not all done: create its shards if need be, hand the audit's lease
        to them and return the pending ones. None: run the audit here (one shard, or every shard
        done and this is the final step)."""
        if self.queue is None or (audit.options or {}).get("sequential"):
            # A sequential audit extracts its images look by look and may stop after the
            # first: shards would compute every image. It runs as one task.
            return None
        shards = ShardRepository(session)
        n_images = int(audit.n_published + audit.n_unpublished)
        existing = shards.all(audit.id)
        if not existing and n_images <= self.settings.shard_size:
            return None
        passes = 2 if (audit.options or {}).get("reference_model") else 1
        rows = existing or shards.ensure(audit.id, n_images, self.settings.shard_size, passes)
        pending = [r.shard for r in rows if r.state != "done"]
        if not pending:
            return None
        if not shards.hand_to_shards(audit.id, owner, self.lease):
            return []
        return pending

    def run_shard(self, audit_id: uuid.UUID, shard: int) -> Outcome:
        """Extract one shard's features into the feature store; the last shard to finish sends
        the final step (:meth:`run`, which then finds every feature stored)."""
        owner = f"{self.name}:{uuid.uuid4().hex[:8]}"
        with self.session_factory() as session:
            repo, shards = AuditRepository(session), ShardRepository(session)
            audit = repo.get(audit_id)
            row = shards.get(audit_id, shard)
            if audit is None or row is None:
                return "missing"
            if AuditState(audit.state).is_terminal:
                return "skipped"
            if row.state == "done":
                # A redelivered task whose worker died after finishing: the final step may never
                # have been sent.
                complete = shards.all_done(audit_id)
                session.commit()
                if complete:
                    self._finalise(audit_id)
                return "skipped"
            if not shards.claim(audit_id, shard, owner, self.lease):
                session.rollback()
                return "busy"
            attempt = repo.next_attempt(audit_id)
            if attempt is None:
                session.rollback()
                return "skipped"
            repo.start_run(audit_id, attempt, owner, shard=shard)
            session.commit()
            session.refresh(row)
            images = repo.images(audit_id)[row.first:row.first + row.count]
            job = Job.read(session, audit, images)
            total = int(row.progress_total)
        log.info("shard started", extra={"audit_id": str(audit_id), "shard": shard, "attempt": attempt,
                                         "worker": owner})
        run = RunState(state=AuditState.EXTRACTING, stage="extracting", total=total)
        stop_heartbeat = threading.Event()
        beat = threading.Thread(target=self._shard_heartbeat, args=(audit_id, shard, owner, run, stop_heartbeat),
                                name=f"heartbeat-{audit_id}-{shard}", daemon=True)
        beat.start()
        store = DatabaseFeatureStore(self.session_factory, audit_id, attempt, run,
                                     shared=self.settings.feature_cache_scope == "shared")
        try:
            outcome = self._execute_shard(audit_id, shard, owner, attempt, job, run, store)
        finally:
            stop_heartbeat.set()
            beat.join(timeout=10)
        log.info("shard ended", extra={"audit_id": str(audit_id), "shard": shard, "attempt": attempt,
                                       "outcome": outcome, "features_computed": store.computed,
                                       "features_reused": store.reused})
        return outcome

    def _execute_shard(self, audit_id: uuid.UUID, shard: int, owner: str, attempt: int, job: Job,
                       run: RunState, store: DatabaseFeatureStore) -> Outcome:
        def release() -> None:
            with self.session_factory() as session:
                ShardRepository(session).release(audit_id, shard, owner)
                session.commit()

        return self._guarded(
            audit_id, attempt, run, f"shard {shard} of audit {audit_id}",
            work=lambda: self._complete_shard(audit_id, shard, owner, attempt, job, run, store),
            release=release, fail=lambda code, message: self._fail_shard(audit_id, attempt, code, message))

    def _complete_shard(self, audit_id: uuid.UUID, shard: int, owner: str, attempt: int, job: Job,
                        run: RunState, store: DatabaseFeatureStore) -> Outcome:
        """Extract the shard's features, mark it done; the last shard sends the final step."""
        from cdi.audit import Progress, extract_shard

        options, adapter, reference = self._prepare(job, run)

        def progress(p: Progress) -> None:
            if p.stage == "extracting":
                with run.lock:
                    run.done, run.total = int(p.done), int(p.total)
                run.changed.set()
            run.check()

        files = list(BlobImages(self.blobs, job.published + job.unpublished))
        extraction = extract_shard(
            files, adapter, store, reference_model=reference, captions=job.captions or None,
            labels=job.labels or None, options=options, progress=progress)
        run.check()
        run.finishing = True
        with self.session_factory() as session:
            marked, complete = ShardRepository(session).complete(audit_id, shard, owner)
            AuditRepository(session).update_run(
                audit_id, attempt, outcome="done" if marked else "superseded", finished_at=_now(),
                forward_passes=extraction.forward_passes, backward_passes=extraction.backward_passes)
            session.commit()
        if complete:
            self._finalise(audit_id)
        else:
            with self.session_factory() as session:
                orphans = ShardRepository(session).orphans(audit_id)
                session.commit()
            self._resend(audit_id, orphans)
        return "done" if marked else "lost"

    def _fail_shard(self, audit_id: uuid.UUID, attempt: int, code: str, message: str) -> Outcome:
        """A shard's failure is the audit's: its images or its model cannot be used."""
        with self.session_factory() as session:
            repo = AuditRepository(session)
            failed = repo.fail_unleased(audit_id, code, message)
            repo.update_run(audit_id, attempt, outcome="failed", finished_at=_now())
            session.commit()
        if failed:
            self.retire_images(audit_id)
            return "failed"
        return self._stopped_outcome(audit_id)

    def _resend(self, audit_id: uuid.UUID, shards: Sequence[int]) -> None:
        """Send again the tasks of shards whose worker died (the broker would, but only after
        its visibility timeout)."""
        assert self.queue is not None
        for shard in shards:
            log.warning("audit %s: shard %s lost its worker; sending it again", audit_id, shard)
            self.queue.enqueue_shard(audit_id, shard)

    def _finalise(self, audit_id: uuid.UUID) -> None:
        """Send the final step: scoring, test, controls and report over the stored features. Sent
        by every worker that finds all shards done; the audit's lease keeps it to one run."""
        assert self.queue is not None
        self.queue.enqueue(audit_id)

    def _shard_heartbeat(self, audit_id: uuid.UUID, shard: int, owner: str, run: RunState,
                         stop: threading.Event) -> None:
        interval = max(0.5, min(self.settings.lease_seconds / 3.0, 5.0))
        while not stop.is_set():
            run.changed.wait(timeout=interval)
            run.changed.clear()
            if stop.is_set() or run.finishing:
                return
            with run.lock:
                done, total = run.done, run.total
            try:
                with self.session_factory() as session:
                    shards = ShardRepository(session)
                    state = shards.heartbeat(audit_id, shard, owner, self.lease, done, total)
                    orphans = shards.orphans(audit_id)
                    session.commit()
                self._resend(audit_id, orphans)
            except OperationalError:
                log.warning("heartbeat of shard %s of audit %s failed (database unreachable); retrying",
                            shard, audit_id)
                continue
            if stop.is_set() or run.finishing:
                return
            if state == AuditState.CANCELLED.value:
                run.stop = AuditStopped("cancelled")
                log.info("audit %s was cancelled; shard %s stops", audit_id, shard)
                return
            if state is None or AuditState(state).is_terminal:
                run.stop = AuditStopped("lost")
                log.warning("audit %s: shard %s was taken over or the audit ended; stopping", audit_id, shard)
                return

    # --- bookkeeping ------------------------------------------------------------------------

    def _set_state(self, run: RunState, state: AuditState, stage: str) -> None:
        with run.lock:
            run.state, run.stage = state, stage
        run.changed.set()

    def _heartbeat(self, audit_id: uuid.UUID, owner: str, run: RunState, stop: threading.Event) -> None:
        interval = max(0.5, min(self.settings.lease_seconds / 3.0, 5.0))
        while not stop.is_set():
            run.changed.wait(timeout=interval)
            run.changed.clear()
            if stop.is_set() or run.finishing:
                return
            with run.lock:
                values = {"state": run.state.value, "progress_stage": run.stage, "progress_done": run.done,
                          "progress_total": run.total}
            try:
                with self.session_factory() as session:
                    state = AuditRepository(session).heartbeat(audit_id, owner, self.lease, **values)
                    session.commit()
            except OperationalError:
                log.warning("heartbeat of audit %s failed (database unreachable); retrying", audit_id)
                continue
            if stop.is_set() or run.finishing:
                return
            if state is None:
                run.stop = AuditStopped("lost")
                log.warning("audit %s: lease lost to another worker; stopping", audit_id)
                return
            if state == AuditState.CANCELLED.value:
                run.stop = AuditStopped("cancelled")
                log.info("audit %s was cancelled; stopping", audit_id)
                return

    def _fail(self, audit_id: uuid.UUID, owner: str, attempt: int, code: str, message: str) -> Outcome:
        with self.session_factory() as session:
            repo = AuditRepository(session)
            failed = repo.finish(audit_id, owner, state=AuditState.FAILED, error_code=code, error_message=message)
            repo.update_run(audit_id, attempt, outcome="failed" if failed else "superseded", finished_at=_now())
            session.commit()
        if failed:
            self.retire_images(audit_id)
        return "failed" if failed else self._stopped_outcome(audit_id)

    def retire_images(self, audit_id: uuid.UUID) -> list[str]:
        """Retention: an audit that ended without ``retain_images`` gives its images up."""
        with self.session_factory() as session:
            repo = AuditRepository(session)
            audit = repo.get(audit_id)
            if audit is None or not AuditState(audit.state).is_terminal or audit.retain_images \
                    or audit.images_deleted:
                return []
            shas = repo.end_images(audit_id)
            session.commit()
        return self.ledger.collect(shas)

    def _record_run(self, audit_id: uuid.UUID, attempt: int, outcome: str) -> None:
        with self.session_factory() as session:
            AuditRepository(session).update_run(audit_id, attempt, outcome=outcome, finished_at=_now())
            session.commit()

    def _stopped_outcome(self, audit_id: uuid.UUID) -> Outcome:
        with self.session_factory() as session:
            audit = AuditRepository(session).get(audit_id)
            return "cancelled" if audit is not None and audit.state == AuditState.CANCELLED.value else "lost"


def _options(opts: Mapping[str, Any], device: str, batch_size: int) -> AuditOptions:
    """The library's options of an audit, as stored at submission."""
    from cdi.audit import AuditOptions
    from cdi.features.layout import FeatureSet

    # Audits queued before these options existed hold no such keys: the defaults of then.
    extra = {k: opts[k] for k in ("sequential", "looks", "spending", "futility", "precision") if k in opts}
    chosen = opts.get("batch_size")  # the form's: a number, "auto", or absent (the deployment's)
    if chosen is not None:
        extra["batch_size"] = None if chosen == "auto" else int(chosen)
    return AuditOptions(alpha=float(opts["alpha"]), protocol=str(opts["protocol"]),
                        features=FeatureSet(opts["features"]), seed=int(opts["seed"]), device=device,
                        **{"batch_size": batch_size, **extra})


@dataclass(frozen=True)
class JobModel:
    """A model as the worker loads it: its registered id, where it is, the weights registered for it."""

    id: str | None
    source: str
    revision: str | None
    weights: Mapping[str, str] | None


@dataclass(frozen=True)
class Job:
    """What a worker needs of an audit (or of one shard's images), read in one transaction.

    ``options`` are the audit's options as stored at submission (JSON); ``published`` and
    ``unpublished`` are (name, SHA-256) pairs in the audit's order.
    """

    model: JobModel
    reference: JobModel | None
    options: Mapping[str, Any]
    published: tuple[tuple[str, str], ...]
    unpublished: tuple[tuple[str, str], ...]
    captions: Mapping[str, str]
    labels: Mapping[str, int]

    @property
    def n_images(self) -> int:
        return len(self.published) + len(self.unpublished)

    @classmethod
    def read(cls, session: Session, audit: Any, images: Sequence[Any]) -> Job:
        models = ModelRepository(session)

        def registered(model_id: str | None) -> dict[str, str] | None:
            row = models.get(model_id) if model_id else None
            return dict(row.weight_sha256) if row is not None and row.weight_sha256 else None

        options = dict(audit.options)
        ref = options.get("reference_model") or None
        return cls(
            model=JobModel(audit.model_id, audit.model_source, audit.model_revision, registered(audit.model_id)),
            reference=None if ref is None else JobModel(ref.get("id"), ref["source"], ref.get("revision"),
                                                        registered(ref.get("id"))),
            options=options,
            published=tuple((im.name, im.sha256) for im in images if im.role == "published"),
            unpublished=tuple((im.name, im.sha256) for im in images if im.role == "unpublished"),
            captions={im.name: im.caption for im in images if im.caption is not None},
            labels={im.name: im.label for im in images if im.label is not None},
        )


def _check_weights(adapter: Any, model_id: str | None, expected: Mapping[str, str] | None) -> None:
    """Refuse weights other than those registered under ``model_id`` (a path names a file on
    each host; the hashes say whether it is the same file)."""
    identity = getattr(adapter, "identity", None)
    if not expected or identity is None:
        return
    found = dict(identity.weight_sha256)
    if found != dict(expected):
        differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise ModelChanged(f"the weights of model {model_id!r} on this worker differ from those registered "
                           f"({', '.join(differ[:5])}); register the model again or fix the worker's copy")


def _now() -> Any:
    from app.storage.models import utcnow

    return utcnow()


def _passes(result: AuditResult) -> tuple[int, int]:
    """The attempt's (forward, backward) pass counts from ``AuditResult``."""
    return int(result.forward_passes), int(result.backward_passes)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _jsonable(obj: Any) -> Any:
    """The report as plain JSON (numpy scalars and arrays, NaN → null)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if hasattr(o, "isoformat"):
            return o.isoformat()
        return str(o)

    text = json.dumps(obj, default=default, allow_nan=True)
    return json.loads(text, parse_constant=lambda _c: None)


def _classify(exc: Exception) -> tuple[str, str]:
    """A failed audit's stable error code and message."""
    from cdi.errors import CdiError, InputError

    if isinstance(exc, CdiError):
        # The library gathers the images it cannot decode into one error; their own codes
        # (image_corrupt, image_truncated, ...) are the documented ones.
        image_errors = exc.image_errors if isinstance(exc, InputError) else ()
        if image_errors:
            codes = {e.code for e in image_errors}
            return (codes.pop() if len(codes) == 1 else "image_corrupt"), str(exc)
        return exc.code, str(exc)
    if isinstance(exc, ModelChanged):
        return "model_changed", str(exc)
    if isinstance(exc, BlobNotFound):
        return "images_missing", f"an uploaded image is missing from storage ({exc}); submit the audit again"
    if type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory", ("the model ran out of accelerator memory; the operator can lower "
                                 "CDI_WORKER_BATCH_SIZE")
    return "internal_error", f"the audit failed unexpectedly ({type(exc).__name__}); the error was logged"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
