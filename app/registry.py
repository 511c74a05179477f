"""The models this deployment can audit: those registered in the database, and the shipped
test models of :mod:`cdi.zoo` (unless ``CDI_REGISTER_ZOO_MODELS=false``).

A model is stored as what names it on every host: a shipped model by its name (each worker
resolves it in its own installed package), a hub id with its revision, or a path (the same
mount on every worker) with its weight files' SHA-256s, which a worker checks before it
audits. Accepting an audit reads this registry only: no weight is opened by the API.

A database entry with the same id as a shipped model takes precedence. Nothing here imports
torch: family detection reads the model's JSON configs only (:mod:`cdi.models.detect`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app import errors as E
from app.errors import BadInput, NotFound
from app.settings import Settings
from app.storage.repositories import ModelRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    source: str
    revision: str | None
    family: str | None
    conditioning: str | None
    description: str
    #: "zoo" for a shipped test model, "registered" for a database entry.
    origin: str


def zoo_models() -> list[ModelInfo]:
    """The shipped test models, as registry entries."""
    try:
        from cdi.zoo import list_models
    except ImportError:  # the library's zoo registry is not installed in this build
        log.warning("cdi.zoo.list_models is not available: no shipped models are registered")
        return []
    out = []
    for m in list_models():
        out.append(ModelInfo(id=str(m.name), source=str(m.name), revision=None,
                             family=getattr(m, "family", None), conditioning=getattr(m, "conditioning", None),
                             description=str(getattr(m, "description", "")), origin="zoo"))
    try:
        from cdi.zoo import list_loras
    except ImportError:
        return out
    for lora in list_loras():  # shipped LoRA fine-tunes: a folder naming base and LoRA
        out.append(ModelInfo(id=lora.name, source=str(lora.name), revision=None,
                             family=lora.manifest.get("family"), conditioning=lora.manifest.get("conditioning"),
                             description=lora.description, origin="zoo"))
    return out


class ModelRegistry:
    def __init__(self, session: Session, settings: Settings) -> None:
        self.repo = ModelRepository(session)
        self.settings = settings

    def list(self) -> list[ModelInfo]:
        registered = {
            r.id: ModelInfo(r.id, r.source, r.revision, r.family, r.conditioning, r.description, "registered")
            for r in self.repo.list()
        }
        shipped = {m.id: m for m in zoo_models()} if self.settings.register_zoo_models else {}
        merged = {**shipped, **registered}
        return [merged[k] for k in sorted(merged)]

    def get(self, model_id: str) -> ModelInfo | None:
        row = self.repo.get(model_id)
        if row is not None:
            return ModelInfo(row.id, row.source, row.revision, row.family, row.conditioning, row.description,
                             "registered")
        if self.settings.register_zoo_models:
            for m in zoo_models():
                if m.id == model_id:
                    return m
        return None

    def resolve(self, model_id: str) -> ModelInfo:
        """The model named in a submission, or a :class:`BadInput` with code ``unknown_model``."""
        info = self.get(model_id.strip())
        if info is None:
            known = ", ".join(m.id for m in self.list()) or "none"
            raise BadInput(f"unknown model {model_id!r}; this deployment audits: {known}", E.UNKNOWN_MODEL)
        return info

    def register(self, model_id: str, source: str, revision: str | None = None,
                 description: str = "", *, hash_weights: bool = False) -> ModelInfo:
        """Register (or update) a model after checking its configs name a supported family.

        With ``hash_weights`` (the operator's command), the SHA-256 of every weight file of a
        local model is stored too, and workers refuse other weights under the same path."""
        from cdi.errors import ModelError
        from cdi.models.detect import detect_family

        if not model_id.strip() or len(model_id) > 200 or any(c.isspace() for c in model_id):
            raise BadInput("a model id is 1-200 characters without spaces", "invalid_model_id")
        try:
            info = detect_family(source, revision=revision)
            hashes = None
            if hash_weights and info.reference.is_local:
                # The operator's command only (it may import torch); a request never hashes.
                from cdi.models.loading import weight_hashes

                hashes = weight_hashes(info)
        except ModelError as exc:
            raise BadInput(str(exc), exc.code) from None
        row = self.repo.upsert(model_id, source=source, revision=revision, family=str(info.family),
                               conditioning=str(info.conditioning), description=description,
                               weight_sha256=hashes)
        return ModelInfo(row.id, row.source, row.revision, row.family, row.conditioning, row.description,
                         "registered")

    def unregister(self, model_id: str) -> None:
        if not self.repo.delete(model_id):
            raise NotFound(f"no registered model {model_id!r}", "model_not_registered")
