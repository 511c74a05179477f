"""/v1/models: what this deployment can audit; registration by an admin."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from app.api.deps import AdminCaller, CurrentCaller, SessionDep, SettingsDep
from app.registry import ModelInfo, ModelRegistry
from app.schemas import ErrorResponse, ModelList, ModelOut, RegisterModel

router = APIRouter(prefix="/models", tags=["models"])


def _out(m: ModelInfo) -> ModelOut:
    return ModelOut(id=m.id, family=m.family, conditioning=m.conditioning, description=m.description,
                    revision=m.revision, origin=m.origin)  # type: ignore[arg-type]


@router.get("", response_model=ModelList, summary="Models this deployment can audit",
            responses={401: {"model": ErrorResponse}})
def list_models(caller: CurrentCaller, session: SessionDep, settings: SettingsDep) -> ModelList:
    return ModelList(items=[_out(m) for m in ModelRegistry(session, settings).list()])


@router.put("/{model_id}", response_model=ModelOut, summary="Register a model (admin)",
            responses={400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
                       401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                       422: {"model": ErrorResponse}})
def register_model(model_id: str, body: RegisterModel, caller: AdminCaller, session: SessionDep,
                   settings: SettingsDep) -> ModelOut:
    """Register (or update) ``model_id`` → a diffusers directory on this host; the family is detected.
    Hub ids are registered from the command line (``cdi admin register-model``).

    A directory with a ``cdi_model.json`` names a model published in parts (a single-file
    checkpoint with its configs, or a UNet or transformer file on a base model)."""
    from app.errors import BadInput

    if body.id != model_id:
        raise BadInput("the body's id differs from the URL's", "invalid_model_id")
    source = Path(body.source)
    if not source.is_dir():
        if source.is_absolute() or body.source.startswith((".", "~")) or source.exists():
            raise BadInput(f"{body.source!r} is not a model directory on this host", "model_not_found")
        # Detecting a hub model's family downloads its configuration: never inside a request
        # (it could take minutes, or hang on the network). The CLI does it on the operator's host.
        raise BadInput(f"{body.source!r} is not a model directory on this host; register hub models with "
                       "`cdi admin register-model ID HUB_ID --revision REV`", "hub_model_via_cli")
    info = ModelRegistry(session, settings).register(model_id, body.source, body.revision, body.description)
    session.commit()
    return _out(info)


@router.delete("/{model_id}", status_code=204, summary="Unregister a model (admin)",
               responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                          404: {"model": ErrorResponse}})
def unregister_model(model_id: str, caller: AdminCaller, session: SessionDep, settings: SettingsDep) -> None:
    ModelRegistry(session, settings).unregister(model_id)
    session.commit()
