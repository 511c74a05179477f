"""LoRA adapters on a loaded model, loaded as the diffusers pipelines load them.

A LoRA is a folder in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)
or one ``.safetensors`` file as published on model-sharing sites (diffusers', kohya's or
peft's key names). A file goes through the family's pipeline built around the model's own
networks (``load_lora_weights``, which converts kohya's names, SDXL's original block names
included, then ``set_adapters``); a peft folder goes through the denoiser's
``load_lora_adapter`` with its own config. It applies to the model's denoiser (UNet or
transformer); every module it names must exist there. ``scale`` multiplies the LoRA's update,
W + scale·ΔW (the adapter weight of ``set_adapters``). Networks diffusers loads no LoRA into
(``UNet2DModel``) take peft folders through peft itself.
"""

from __future__ import annotations

import json
import math
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
    """Load the LoRA at ``source`` onto ``adapter``'s denoiser; its identity for the report.

    A single file goes through the family's pipeline exactly as ``pipe.load_lora_weights``
    followed by ``pipe.set_adapters(name, scale)`` takes it (kohya's, diffusers' and peft's key
    names, SDXL's block names mapped through the UNet's config); a peft folder is loaded with
    its own ``adapter_config.json`` as the LoRA's configuration. Every module the LoRA names
    must exist in the model: a LoRA that only partly lands is refused, naming what did not.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(float(scale)):
        raise MalformedModelError(f"LoRA scale must be a finite number, got {scale!r}")
    path = resolve_lora(source)
    weights = _weight_file(path, allow_pickle)
    net = adapter.denoiser
    files = [weights] + ([path / "adapter_config.json"] if path.is_dir() and (path / "adapter_config.json").is_file()
                         else [])
    peft_folder = len(files) == 2
    if getattr(net, "load_lora_adapter", None) is None:
        if not peft_folder:
            raise UnsupportedModelError(
                f"a {type(net).__name__} takes LoRAs in peft's folder format (adapter_config.json + "
                f"adapter_model.safetensors), not as one file")
        _apply_peft(net, path, _scaled(_read(weights), float(scale)))
    elif peft_folder:
        _apply_peft_folder(net, path, weights, float(scale))
    else:
        _apply_file(adapter, net, weights, float(scale))
    net.requires_grad_(False)
    net.eval()
    root = path if path.is_dir() else path.parent
    return LoraIdentity(str(path), {f.relative_to(root).as_posix(): file_sha256(f) for f in files}, float(scale))


def _lora_config(folder: Path) -> dict[str, Any]:
    from peft import LoraConfig

    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        fields = {k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
        LoraConfig(**fields)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise MalformedModelError(f"LoRA {folder}: adapter_config.json is not a LoRA config ({exc})") from None
    return fields


def _apply_peft(net: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """A network diffusers loads no LoRA into (``UNet2DModel``): peft's own injection, the
    scale folded into every B (ΔW = B·A·alpha/r, so scaling B scales ΔW exactly)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = LoraConfig(**_lora_config(folder))
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


def _apply_peft_folder(net: Any, folder: Path, weights: Path, scale: float) -> None:
    """A peft folder on a diffusers denoiser: ``load_lora_adapter`` with the folder's config
    (as the pipelines take a LoRA whose file carries its config), then ``set_adapters``."""
    state = _read(weights)
    # PeftModel.save_pretrained writes the wrapped model's names under base_model.model.
    wrapped = "base_model.model."
    if state and all(k.startswith(wrapped) for k in state):
        state = {k.removeprefix(wrapped): v for k, v in state.items()}
    config = _lora_config(folder)
    _check_modules({"denoiser": net}, {"denoiser": _lora_modules(state, net, True)}, folder,
                   lambda: net.load_lora_adapter(dict(state), prefix=None, metadata=config, adapter_name=ADAPTER_NAME))
    net.set_adapters([ADAPTER_NAME], weights=[scale])


def _apply_file(adapter: Any, net: Any, weights: Path, scale: float) -> None:
    """One LoRA file through the family's pipeline: ``load_lora_weights`` + ``set_adapters``."""
    pipe = adapter.as_pipeline()
    try:
        kwargs = {"unet_config": net.config} if hasattr(pipe, "unet") else {}
        out = type(pipe).lora_state_dict(str(weights), **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise MalformedModelError(f"cannot read LoRA {weights}: {exc}") from None
    state = out[0] if isinstance(out, tuple) else out
    prefix = adapter.lora_prefix
    # The networks the pipeline's load_lora_weights loads into, by the prefix of their keys.
    networks: dict[str, Any] = {prefix: net}
    networks.update({name: getattr(adapter, name) for name in adapter.lora_text_encoders
                     if getattr(adapter, name, None) is not None})
    stray = sorted(k for k in state if k.split(".", 1)[0] not in networks)
    if stray:
        # The pipeline would skip them: the model audited would not be the file's.
        raise UnsupportedModelError(
            f"LoRA {weights} does not fit this model: {len(stray)} of its weights name no module of its "
            f"{', '.join(networks)} (e.g. {stray[0]})")
    expected = {name: _lora_modules({k.removeprefix(f"{name}."): v for k, v in state.items()
                                     if k.startswith(f"{name}.")}, module, name == prefix)
                for name, module in networks.items()}
    _check_modules(networks, expected, weights,
                   lambda: pipe.load_lora_weights(str(weights), adapter_name=ADAPTER_NAME))
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    for name, module in networks.items():
        if name != prefix:
            module.requires_grad_(False)
            module.eval()


def _lora_modules(state: dict[str, torch.Tensor], network: Any, denoiser: bool) -> set[str]:
    """The modules of ``network`` a LoRA state dict (its part, without prefix) names, converted
    to peft's names as diffusers converts them for a denoiser or a text encoder."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not state:
        return set()
    if denoiser:
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(dict(state))  # type: ignore[no-untyped-call]
    else:
        diffusers_names = convert_state_dict_to_diffusers(dict(state))  # type: ignore[no-untyped-call]
        state = convert_state_dict_to_peft(diffusers_names)  # type: ignore[no-untyped-call]
        if not hasattr(network, "text_model"):
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # A name diffusers does not convert to peft's is a weight no module receives.
    return {k.split(".lora_", 1)[0] if ".lora_" in k else k.removesuffix(".weight").removesuffix(".bias")
            for k in state if not k.endswith(".alpha")}


def _loaded_modules(net: torch.nn.Module) -> set[str]:
    return {name for name, module in net.named_modules()
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and ADAPTER_NAME in module.lora_A}


def _check_modules(networks: dict[str, Any], expected: dict[str, set[str]], where: Path, load: Any) -> None:
    """Run ``load`` and refuse the LoRA unless every module it names (``expected``, per network)
    received its weights."""
    try:
        load()
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise UnsupportedModelError(f"LoRA {where} does not fit this model: {exc}") from None
    if not any(_loaded_modules(n) for n in networks.values()):
        raise UnsupportedModelError(f"LoRA {where} adapts no layer of this model")
    total = sum(len(e) for e in expected.values())
    for name, network in networks.items():
        missing = sorted(expected.get(name, set()) - _loaded_modules(network))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UnsupportedModelError(
                f"LoRA {where} does not fit this model: {len(missing)} of its {total} modules are not in "
                f"the {type(network).__name__} ({shown}); a LoRA is applied whole or not at all")


def _check_all_loaded(net: torch.nn.Module, where: Path) -> None:
    if not any("lora_" in n for n, _ in net.named_parameters()):
        raise UnsupportedModelError(f"LoRA {where} adapts no layer of this model")
