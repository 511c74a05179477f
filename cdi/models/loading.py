"""Loading a model's components through diffusers' own ``from_pretrained``.

Local directories and hub ids go through the same calls; only where the files live differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from cdi.errors import MalformedModelError, ModelError
from cdi.models.base import ModelIdentity
from cdi.models.detect import ModelInfo

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def load_component(info: ModelInfo, role: str, dtype: torch.dtype | None = None) -> Any:
    """Instantiate one component (``unet``, ``autoencoder``, ``text_encoder``, …) of a model."""
    import diffusers
    import transformers

    folder = info.components[role]
    cls_name = info.classes[role]
    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name, None)
    if cls is None:
        raise MalformedModelError(f"{info.reference.source}: unknown component class {cls_name}")
    ref = info.reference
    kwargs: dict[str, Any] = {"subfolder": folder, "revision": ref.revision}
    if dtype is not None and role not in ("tokenizer", "scheduler"):
        kwargs["torch_dtype"] = dtype
    try:
        if role == "scheduler":
            return cls.from_pretrained(ref.source, **kwargs)
        module = cls.from_pretrained(ref.source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MalformedModelError(f"{ref.source}: cannot load {folder} ({exc})") from None
    if isinstance(module, torch.nn.Module):
        module.eval()
        module.requires_grad_(False)
    return module


def alphas_cumprod_of(info: ModelInfo) -> torch.Tensor:
    """ᾱ_t of the model's own scheduler, float64 on the CPU."""
    scheduler = load_component(info, "scheduler")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ModelError(
            f"{info.reference.source}: scheduler {type(scheduler).__name__} exposes no alphas_cumprod"
        )
    return torch.as_tensor(alphas, dtype=torch.float64).cpu()


def prediction_type_of(info: ModelInfo) -> str:
    value = info.configs["scheduler"].get("prediction_type", "epsilon")
    if value not in ("epsilon", "v_prediction", "sample"):
        raise MalformedModelError(f"{info.reference.source}: unknown prediction_type {value!r}")
    return str(value)


def _model_files_root(info: ModelInfo) -> Path | None:
    ref = info.reference
    if ref.is_local:
        return Path(ref.source)
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{folder}/*" for folder in info.components.values()]
        return Path(
            snapshot_download(ref.source, revision=ref.revision, allow_patterns=patterns,
                              local_files_only=True)
        )
    except Exception:
        return None


def weight_hashes(info: ModelInfo) -> dict[str, str]:
    """SHA-256 of every weight file of the model's components, keyed by relative path."""
    root = _model_files_root(info)
    if root is None:
        return {}
    out: dict[str, str] = {}
    for folder in sorted(set(info.components.values())):
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                h = hashlib.sha256()
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                out[path.relative_to(root).as_posix()] = h.hexdigest()
    return out


def identity_of(info: ModelInfo) -> ModelIdentity:
    return ModelIdentity(reference=info.reference, family=info.family, weight_sha256=weight_hashes(info))
