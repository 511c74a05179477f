"""/v1/callbacks/secret: the key that signs the caller's callbacks (Standard Webhooks)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import CurrentCaller, SessionDep
from app.schemas import ErrorResponse
from app.storage.repositories import TenantRepository

router = APIRouter(prefix="/callbacks", tags=["callbacks"])


class WebhookSecret(BaseModel):
    secret: str = Field(description="`whsec_` + base64 key: verify `webhook-signature` with it (docs/service.md).")


@router.get("/secret", response_model=WebhookSecret, responses={401: {"model": ErrorResponse}},
            summary="The secret that signs this tenant's callbacks")
def get_secret(caller: CurrentCaller, session: SessionDep) -> WebhookSecret:
    secret = TenantRepository(session).webhook_secret(caller.tenant_id)
    session.commit()
    return WebhookSecret(secret=secret)


@router.post("/secret/rotate", response_model=WebhookSecret, responses={401: {"model": ErrorResponse}},
             summary="Replace the secret (callbacks sent from now on use the new one)")
def rotate_secret(caller: CurrentCaller, session: SessionDep) -> WebhookSecret:
    secret = TenantRepository(session).webhook_secret(caller.tenant_id, rotate=True)
    session.commit()
    return WebhookSecret(secret=secret)
