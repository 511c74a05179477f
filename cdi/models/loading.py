"""Loading a model's components through diffusers' own ``from_pretrained``.

Local directories and hub ids go through the same calls; only where the files live differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cdi.errors import MalformedModelError, ModelError, PickledWeightsError
from cdi.models.base import ModelIdentity
from cdi.models.detect import NO_WEIGHTS as _NO_WEIGHTS
from cdi.models.detect import PICKLE_SUFFIXES, WEIGHT_SUFFIXES, ModelInfo, file_sha256, weight_hashes

__all__ = ["PICKLE_SUFFIXES", "WEIGHT_SUFFIXES", "file_sha256", "identity_of", "load_component", "weight_hashes"]

#: The environment variable that allows pickled weights, as ``--allow-pickle`` does.
ALLOW_PICKLE_ENV = "CDI_ALLOW_PICKLE"


def pickle_allowed(explicit: bool | None = None) -> bool:
    """``explicit`` if given, else whether ``CDI_ALLOW_PICKLE=1`` is set."""
    if explicit is not None:
        return bool(explicit)
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def refuse_pickle(paths: list[str], where: str) -> PickledWeightsError:
    names = ", ".join(paths[:5]) + (" …" if len(paths) > 5 else "")
    return PickledWeightsError(
        f"{where}: the weights are pickled ({names}); loading a pickle runs code from the file. "
        f"Convert them to .safetensors, or allow pickled weights with --allow-pickle "
        f"(environment: {ALLOW_PICKLE_ENV}=1) if you trust the file"
    )


def check_weight_files(info: ModelInfo) -> None:
    """Refuse a local model whose weights exist only as pickles, unless they are allowed.

    A folder with ``.safetensors`` weights loads those (diffusers and transformers prefer
    them); hub models are held to the same rule by loading with ``use_safetensors=True``.
    """
    if info.allow_pickle or not info.reference.is_local:
        return
    root = Path(info.reference.source)
    pickled: list[str] = []
    for role, folder in info.components.items():
        if role in _NO_WEIGHTS or not (root / folder).is_dir():
            continue
        files = [p for p in (root / folder).rglob("*") if p.is_file()]
        if not any(p.suffix == ".safetensors" for p in files):
            pickled += [p.relative_to(root).as_posix() for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise refuse_pickle(sorted(pickled), info.reference.source)


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
    if role not in _NO_WEIGHTS:
        check_weight_files(info)
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        if not info.allow_pickle:
            kwargs["use_safetensors"] = True
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


def identity_of(info: ModelInfo) -> ModelIdentity:
    return ModelIdentity(reference=info.reference, family=info.family, weight_sha256=weight_hashes(info))
