"""LoRA adapters on a loaded model: diffusers' own LoRA loading, through peft.

A LoRA is a folder in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)
or one ``.safetensors`` file as published on model-sharing sites (diffusers' or kohya's key
names; diffusers converts them). It applies to the model's denoiser (UNet or transformer).
``scale`` multiplies the LoRA's update W + scale·ΔW (diffusers' ``lora_scale``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdi.errors import MalformedModelError, ModelNotFoundError, UnsupportedModelError
from cdi.models.detect import PICKLE_SUFFIXES, WEIGHT_SUFFIXES
from cdi.models.loading import file_sha256, refuse_pickle

ADAPTER_NAME = "cdi"
_UP_KEYS = ("lora_B", "lora.up", "lora_up")


@dataclass(frozen=True)
class LoraIdentity:
    """Where the LoRA came from, the SHA-256 of each of its files, and the scale applied."""

    source: str
    sha256: dict[str, str]
    scale: float

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "sha256": dict(self.sha256), "scale": self.scale}


def resolve_lora(source: str) -> Path:
    """A LoRA file or folder, or the name of a shipped one (``cdi.zoo``)."""
    path = Path(source).expanduser()
    if not path.exists() and "/" not in source:
        try:
            from cdi import zoo

            path = zoo.get_lora(source).lora_path
        except (ImportError, KeyError, AttributeError):
            pass
    if not path.exists():
        raise ModelNotFoundError(f"LoRA {source!r} is neither a file, a folder nor a shipped LoRA")
    return path.resolve()


def _weight_file(path: Path, allow_pickle: bool) -> Path:
    if path.is_file():
        weights = path
    else:
        candidates = sorted(path.glob("*.safetensors")) or sorted(
            p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not candidates:
            raise MalformedModelError(f"LoRA folder {path} holds no .safetensors weights")
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise MalformedModelError(f"LoRA folder {path} holds several weight files ({names}); name one")
        weights = candidates[0]
    if weights.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise refuse_pickle([weights.name], f"LoRA {path}")
    if weights.suffix not in WEIGHT_SUFFIXES:
        raise MalformedModelError(f"LoRA {weights} is not a .safetensors file")
    return weights


def _read(weights: Path) -> dict[str, torch.Tensor]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(weights)))
        return dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        raise MalformedModelError(f"cannot read LoRA {weights}: {exc}") from None


def _scaled(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    # ΔW = B·A·(alpha/r): scaling every B scales ΔW exactly.
    return {k: (v.float() * scale if any(u in k for u in _UP_KEYS) else v.float()) for k, v in state.items()}


def apply_lora(adapter: Any, source: str, scale: float = 1.0, allow_pickle: bool = False) -> LoraIdentity:
    """Load the LoRA at ``source`` onto ``adapter``'s denoiser; its identity for the report."""
    if not isinstance(scale, int | float) or not torch.isfinite(torch.tensor(float(scale))):
        raise MalformedModelError(f"LoRA scale must be a finite number, got {scale!r}")
    path = resolve_lora(source)
    weights = _weight_file(path, allow_pickle)
    net = adapter.denoiser
    files = [weights] + ([path / "adapter_config.json"] if path.is_dir() and (path / "adapter_config.json").is_file()
                         else [])
    if len(files) == 2:
        _apply_peft(net, path, _scaled(_read(weights), float(scale)))
    else:
        _apply_diffusers(adapter, net, weights, float(scale))
    net.requires_grad_(False)
    net.eval()
    root = path if path.is_dir() else path.parent
    return LoraIdentity(str(path), {f.relative_to(root).as_posix(): file_sha256(f) for f in files}, float(scale))


def _apply_peft(net: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor]) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    try:
        config = LoraConfig(**{k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items()
                               if k in LoraConfig.__dataclass_fields__})
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise MalformedModelError(f"LoRA {folder}: adapter_config.json is not a LoRA config ({exc})") from None
    try:
        inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise UnsupportedModelError(f"LoRA {folder} does not fit this model: {exc}") from None
    result = set_peft_model_state_dict(net, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UnsupportedModelError(
            f"LoRA {folder} does not fit this model: {len(unexpected)} weights name modules it lacks "
            f"(e.g. {unexpected[0]})")
    _check_all_loaded(net, folder)


def _apply_diffusers(adapter: Any, net: torch.nn.Module, weights: Path, scale: float) -> None:
    load = getattr(net, "load_lora_adapter", None)
    if load is None:
        raise UnsupportedModelError(
            f"a {type(net).__name__} takes LoRAs in peft's folder format (adapter_config.json + "
            f"adapter_model.safetensors), not as one file")
    pipeline = adapter.lora_pipeline_class()
    try:
        state, alphas = _lora_state(pipeline, weights)
    except (ValueError, KeyError, OSError) as exc:
        raise MalformedModelError(f"cannot read LoRA {weights}: {exc}") from None
    prefix = adapter.lora_prefix
    if any(k.startswith(("text_encoder", "te_", "lora_te")) for k in state):
        raise UnsupportedModelError(
            f"LoRA {weights} also adapts the text encoder; only LoRAs of the {prefix} are supported")
    state = _scaled(state, scale)
    try:
        load(state, network_alphas=alphas, prefix=prefix if any(k.startswith(f"{prefix}.") for k in state) else None,
             adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UnsupportedModelError(f"LoRA {weights} does not fit this model: {exc}") from None
    _check_all_loaded(net, weights)


def _lora_state(pipeline: Any, weights: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The LoRA's weights in diffusers' names and kohya's alphas (None where the family's
    reader folds them in): SD 1.x and SDXL readers return both, SD3's and Flux's the weights
    alone unless asked for the alphas."""
    import inspect

    if pipeline is None:
        return _read(weights), None
    kwargs = {"return_alphas": True} if "return_alphas" in inspect.signature(pipeline.lora_state_dict).parameters \
        else {}
    out = pipeline.lora_state_dict(str(weights), **kwargs)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def _check_all_loaded(net: torch.nn.Module, where: Path) -> None:
    if not any("lora_" in n for n, _ in net.named_parameters()):
        raise UnsupportedModelError(f"LoRA {where} adapts no layer of this model")
