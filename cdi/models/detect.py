"""Model references and family detection from a model's own config files.

This module reads JSON only and never imports torch, so the web service can validate a
model reference without loading it. A reference is a local directory in diffusers layout,
or a hub repository id with an optional revision; both are read through the same
functions, so hub models take the same code path as the local ones tested here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdi.errors import MalformedModelError, ModelIdentityError, ModelNotFoundError, UnsupportedModelError
from cdi.models.base import Conditioning, ModelReference

#: diffusers pipeline class → CDI family.
PIPELINE_FAMILIES: dict[str, str] = {
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "LDMPipeline": "latent",
    "DiTPipeline": "dit",
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionImg2ImgPipeline": "stable-diffusion",
}

#: For each family: role → (accepted component folder names, accepted classes).
FAMILY_COMPONENTS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "pixel": {
        "unet": (("unet",), ("UNet2DModel",)),
        "scheduler": (("scheduler",), ()),
    },
    "latent": {
        "unet": (("unet",), ("UNet2DModel",)),
        "autoencoder": (("vqvae", "vae"), ("VQModel", "AutoencoderKL")),
        "scheduler": (("scheduler",), ()),
    },
    "dit": {
        "transformer": (("transformer",), ("DiTTransformer2DModel", "Transformer2DModel")),
        "autoencoder": (("vae",), ("AutoencoderKL",)),
        "scheduler": (("scheduler",), ()),
    },
    "stable-diffusion": {
        "unet": (("unet",), ("UNet2DConditionModel",)),
        "autoencoder": (("vae",), ("AutoencoderKL",)),
        "text_encoder": (("text_encoder",), ("CLIPTextModel",)),
        "tokenizer": (("tokenizer",), ("CLIPTokenizer", "CLIPTokenizerFast")),
        "scheduler": (("scheduler",), ()),
    },
}

#: A folder holding this file is a LoRA model: {"base": model reference, "lora": path
#: relative to the folder, "scale": number (optional)}. It names a fine-tune by one reference,
#: as a registry entry or ``--model`` can.
LORA_MODEL_FILE = "lora_model.json"

#: Weight files whose loading unpickles (runs code from the file).
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
#: Components that hold no weights.
NO_WEIGHTS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelInfo:
    """What the config files say about a model, before any weight is loaded."""

    reference: ModelReference
    family: str
    #: role → subfolder, e.g. {"unet": "unet", "autoencoder": "vqvae", "scheduler": "scheduler"}.
    components: dict[str, str]
    #: role → that component's class name as its config gives it.
    classes: dict[str, str]
    conditioning: Conditioning
    image_size: int
    image_channels: int
    num_classes: int | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: Whether pickled weight files may be loaded (see :func:`cdi.models.loading.check_weight_files`).
    allow_pickle: bool = False
    #: A LoRA to load onto the denoiser, from a LoRA model folder (:data:`LORA_MODEL_FILE`).
    lora: str | None = None
    lora_scale: float = 1.0


def resolve_reference(source: str, revision: str | None = None) -> ModelReference:
    """A local directory if ``source`` is one, else a hub id (``owner/name``)."""
    if not source or not source.strip():
        raise ModelNotFoundError("the model reference is empty")
    path = Path(source).expanduser()
    if not path.exists() and "/" not in source:
        shipped = _zoo_path(source)
        if shipped is not None:
            path = shipped
    if path.is_dir():
        return ModelReference(source=str(path.resolve()), revision=revision, is_local=True)
    if path.exists():
        raise ModelNotFoundError(f"{source} is a file; a model is a directory in diffusers layout")
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return ModelReference(source=source, revision=revision, is_local=False)
    raise ModelNotFoundError(
        f"{source!r} is neither a local model directory nor a hub id of the form owner/name"
    )


def _zoo_path(name: str) -> Path | None:
    """The directory of a shipped test model named ``name``, if there is one."""
    try:
        from cdi import zoo
    except ImportError:
        return None
    for get in ("get", "get_lora"):
        try:
            return Path(getattr(zoo, get)(name).path)
        except (KeyError, AttributeError):
            continue
    return None


def read_json(ref: ModelReference, relpath: str) -> dict[str, Any]:
    """Read one JSON file of the model; a missing or invalid file raises a clear error."""
    if ref.is_local:
        path = Path(ref.source) / relpath
        if not path.is_file():
            raise MalformedModelError(f"{ref.source}: missing {relpath}")
        text = path.read_text(encoding="utf-8")
    else:
        try:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(ref.source, relpath, revision=ref.revision)
        except Exception as exc:  # the hub client raises many unrelated types
            raise ModelNotFoundError(
                f"cannot fetch {relpath} of {ref.source}@{ref.revision or 'main'}: {exc}"
            ) from None
        text = Path(local).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedModelError(f"{ref.source}: {relpath} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MalformedModelError(f"{ref.source}: {relpath} must hold a JSON object")
    return data


def _component_config(ref: ModelReference, folder: str, role: str) -> dict[str, Any]:
    name = "scheduler_config.json" if role == "scheduler" else "config.json"
    if role == "tokenizer":
        # Tokenizers keep their settings in tokenizer_config.json; its class is in model_index.
        name = "tokenizer_config.json"
    return read_json(ref, f"{folder}/{name}")


def _int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, list | tuple) and value:
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise MalformedModelError(f"{where}: config entry {key!r} is missing or not a positive integer")
    return value


def detect_family(source: str, revision: str | None = None) -> ModelInfo:
    """Detect a model's family and check that the files its family needs are present."""
    ref = resolve_reference(source, revision)
    if ref.is_local and (Path(ref.source) / LORA_MODEL_FILE).is_file():
        return _lora_model(ref)
    index = read_json(ref, "model_index.json")
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str):
        raise MalformedModelError(f"{ref.source}: model_index.json has no _class_name")
    family = PIPELINE_FAMILIES.get(pipeline)
    if family is None:
        supported = ", ".join(sorted(PIPELINE_FAMILIES))
        raise UnsupportedModelError(
            f"{ref.source}: pipeline {pipeline} is not supported (supported: {supported})"
        )

    components: dict[str, str] = {}
    classes: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    for role, (folders, accepted) in FAMILY_COMPONENTS[family].items():
        folder = next((f for f in folders if isinstance(index.get(f), list)), None)
        if folder is None:
            raise MalformedModelError(
                f"{ref.source}: model_index.json lists no {' or '.join(folders)} component "
                f"(needed by a {pipeline})"
            )
        entry = index[folder]
        declared = entry[1] if len(entry) == 2 and isinstance(entry[1], str) else None
        config = _component_config(ref, folder, role)
        cls = config.get("_class_name") or declared
        if role == "tokenizer":
            cls = declared or config.get("tokenizer_class")
        if not isinstance(cls, str):
            raise MalformedModelError(f"{ref.source}: cannot tell the class of component {folder}")
        if accepted and cls not in accepted:
            raise UnsupportedModelError(
                f"{ref.source}: component {folder} is a {cls}; a {family} model needs "
                f"{' or '.join(accepted)}"
            )
        components[role] = folder
        classes[role] = cls
        configs[role] = config

    sched = configs["scheduler"]
    if "num_train_timesteps" not in sched and "trained_betas" not in sched:
        raise MalformedModelError(
            f"{ref.source}: scheduler config has neither num_train_timesteps nor trained_betas"
        )

    num_classes: int | None = None
    if family in ("pixel", "latent"):
        unet = configs["unet"]
        size = _int(unet, "sample_size", f"{ref.source}/unet/config.json")
        n = unet.get("num_class_embeds")
        num_classes = n if isinstance(n, int) and n > 0 else None
        conditioning: Conditioning = "class" if num_classes else "none"
        if family == "pixel":
            channels = _int(unet, "in_channels", f"{ref.source}/unet/config.json")
        else:
            ae = configs["autoencoder"]
            where = f"{ref.source}/{components['autoencoder']}/config.json"
            channels = _int(ae, "in_channels", where)
            size *= 2 ** (len(ae.get("block_out_channels") or [0]) - 1)
    elif family == "dit":
        tr = configs["transformer"]
        ae = configs["autoencoder"]
        size = _int(tr, "sample_size", f"{ref.source}/transformer/config.json")
        size *= 2 ** (len(ae.get("block_out_channels") or [0]) - 1)
        channels = _int(ae, "in_channels", f"{ref.source}/vae/config.json")
        num_classes = _int(tr, "num_embeds_ada_norm", f"{ref.source}/transformer/config.json")
        conditioning = "class"
    else:
        unet = configs["unet"]
        ae = configs["autoencoder"]
        size = _int(unet, "sample_size", f"{ref.source}/unet/config.json")
        size *= 2 ** (len(ae.get("block_out_channels") or [0]) - 1)
        channels = _int(ae, "in_channels", f"{ref.source}/vae/config.json")
        conditioning = "text"
    if channels not in (1, 3):
        raise UnsupportedModelError(f"{ref.source}: models with {channels} image channels are not supported")

    return ModelInfo(
        reference=ref,
        family=family,
        components=components,
        classes=classes,
        conditioning=conditioning,
        image_size=size,
        image_channels=channels,
        num_classes=num_classes,
        configs=configs,
    )


def _lora_model(ref: ModelReference) -> ModelInfo:
    """A LoRA model folder: its base's info, with the LoRA to load onto it."""
    spec = read_json(ref, LORA_MODEL_FILE)
    base, lora, scale = spec.get("base"), spec.get("lora"), spec.get("scale", 1.0)
    where = f"{ref.source}/{LORA_MODEL_FILE}"
    if not isinstance(base, str) or not base:
        raise MalformedModelError(f"{where}: 'base' must name the base model")
    if not isinstance(lora, str) or not lora or Path(lora).is_absolute() or ".." in Path(lora).parts:
        raise MalformedModelError(f"{where}: 'lora' must be a path inside the folder")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise MalformedModelError(f"{where}: 'scale' must be a number")
    lora_path = Path(ref.source) / lora
    if not lora_path.exists():
        raise MalformedModelError(f"{ref.source}: missing {lora}")
    base_path = Path(ref.source) / base
    info = detect_family(str(base_path) if base_path.is_dir() else base)
    if info.lora is not None:
        raise MalformedModelError(f"{where}: the base is itself a LoRA model")
    return dataclasses.replace(info, lora=str(lora_path), lora_scale=float(scale))


# --- weight hashes (no torch: a registry hashes a model without loading it) ---------------


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


def file_sha256(path: Path) -> str:
    """SHA-256 of one file; a file that cannot be read is a :class:`ModelIdentityError`."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise ModelIdentityError(f"cannot hash {path}: {exc.strerror or exc}") from None
    return h.hexdigest()


def weight_hashes(info: ModelInfo) -> dict[str, str]:
    """SHA-256 of every weight file of the model's components, keyed by relative path.

    Raises :class:`ModelIdentityError` when the files cannot be found or read, and
    :class:`MalformedModelError` when a component that holds weights has none: a model is
    never given an empty identity (two different models would share a feature-cache key).
    """
    root = _model_files_root(info)
    if root is None:
        raise ModelIdentityError(
            f"cannot hash the weights of {info.reference.source}@{info.reference.revision or 'main'}: "
            "its files are not available locally"
        )
    out: dict[str, str] = {}
    for role, folder in sorted(info.components.items()):
        base = root / folder
        files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) \
            if base.is_dir() else []
        if not files and role not in NO_WEIGHTS:
            raise MalformedModelError(f"{info.reference.source}: cannot load {folder} (it has no weight file)")
        for path in files:
            out[path.relative_to(root).as_posix()] = file_sha256(path)
    return out
