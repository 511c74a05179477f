"""A model published in parts, registered by one folder (``cdi_model.json``): the registry
detects its family, and the operator's command stores the hashes of the files it loads."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from app.storage.db import session_scope

from .conftest import Service

pytestmark = [pytest.mark.integration]


def _fine_tune_folder(root: Path) -> Path:
    import shutil

    import tiny_models as tm

    base = tm.build_stable_diffusion(root / "base")
    tuned = tm.build_stable_diffusion(root / "tuned", seed=3)
    folder = root / "fine-tune"
    folder.mkdir()
    shutil.copy(tuned / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet.safetensors")
    (folder / "cdi_model.json").write_text(json.dumps({"base": str(base), "unet": "unet.safetensors"}))
    return folder


def test_register_a_unet_file_with_its_base(service: Service, migrated: str, tmp_path: Any) -> None:
    from app.registry import ModelRegistry
    from app.settings import Settings
    from app.storage.repositories import ModelRepository
    from cdi.models import load_model

    folder = _fine_tune_folder(tmp_path)
    model_id = f"ft-{uuid.uuid4().hex[:6]}"
    body = {"id": model_id, "source": str(folder), "description": "a UNet file on its base"}
    r = service.client.put(f"/v1/models/{model_id}", headers=service.headers(service.admin), json=body)  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    assert r.json()["family"] == "stable-diffusion" and r.json()["conditioning"] == "text"
    # The operator's command hashes what a worker will load: the file, and the base's other weights.
    settings = Settings(database_url=migrated, blob_dir=tmp_path / "blobs")
    with session_scope(migrated) as s:
        ModelRegistry(s, settings).register(model_id, str(folder), hash_weights=True)
    with session_scope(migrated) as s:
        row = ModelRepository(s).get(model_id)
        assert row is not None and row.weight_sha256 is not None
        assert dict(row.weight_sha256) == dict(load_model(str(folder)).identity.weight_sha256)
        assert "unet:unet.safetensors" in row.weight_sha256
    (folder / "cdi_model.json").write_text(json.dumps({"base": str(tmp_path / "base"), "unet": "/etc/passwd"}))
    r = service.client.put(f"/v1/models/{model_id}", headers=service.headers(service.admin), json=body)  # type: ignore[attr-defined]
    assert r.status_code == 422 and "inside the folder" in r.json()["error"]["message"]
    service.client.delete(f"/v1/models/{model_id}", headers=service.headers(service.admin))  # type: ignore[attr-defined]
