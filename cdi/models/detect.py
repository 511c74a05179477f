"""Model references and family detection from a model's own config files.

This module reads JSON only and never imports torch, so the web service can validate a
model reference without loading it. A reference is a local directory in diffusers layout,
or a hub repository id with an optional revision; both are read through the same
functions, so hub models take the same code path as the local ones tested here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdi.errors import InputError, MalformedModelError, ModelNotFoundError, UnsupportedModelError
from cdi.models.base import Conditioning, FamilyName, ModelReference

#: diffusers pipeline class → CDI family.
PIPELINE_FAMILIES: dict[str, FamilyName] = {
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "LDMPipeline": "latent",
    "DiTPipeline": "dit",
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionImg2ImgPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "StableDiffusionXLImg2ImgPipeline": "stable-diffusion-xl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}

_CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")
_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)

#: For each family: role → (accepted component folder names, accepted classes).
FAMILY_COMPONENTS: dict[FamilyName, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
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
        "tokenizer": (("tokenizer",), _CLIP_TOKENIZERS),
        "scheduler": (("scheduler",), ()),
    },
    "stable-diffusion-xl": {
        "unet": (("unet",), ("UNet2DConditionModel",)),
        "autoencoder": (("vae",), ("AutoencoderKL",)),
        "text_encoder": (("text_encoder",), ("CLIPTextModel",)),
        "text_encoder_2": (("text_encoder_2",), ("CLIPTextModelWithProjection",)),
        "tokenizer": (("tokenizer",), _CLIP_TOKENIZERS),
        "tokenizer_2": (("tokenizer_2",), _CLIP_TOKENIZERS),
        "scheduler": (("scheduler",), ()),
    },
    "sd3": {
        "transformer": (("transformer",), ("SD3Transformer2DModel",)),
        "autoencoder": (("vae",), ("AutoencoderKL",)),
        "text_encoder": (("text_encoder",), ("CLIPTextModelWithProjection",)),
        "text_encoder_2": (("text_encoder_2",), ("CLIPTextModelWithProjection",)),
        "text_encoder_3": (("text_encoder_3",), ("T5EncoderModel",)),
        "tokenizer": (("tokenizer",), _CLIP_TOKENIZERS),
        "tokenizer_2": (("tokenizer_2",), _CLIP_TOKENIZERS),
        "tokenizer_3": (("tokenizer_3",), _T5_TOKENIZERS),
        "scheduler": (("scheduler",), _FLOW_SCHEDULERS),
    },
    "flux": {
        "transformer": (("transformer",), ("FluxTransformer2DModel",)),
        "autoencoder": (("vae",), ("AutoencoderKL",)),
        "text_encoder": (("text_encoder",), ("CLIPTextModel",)),
        "text_encoder_2": (("text_encoder_2",), ("T5EncoderModel",)),
        "tokenizer": (("tokenizer",), _CLIP_TOKENIZERS),
        "tokenizer_2": (("tokenizer_2",), _T5_TOKENIZERS),
        "scheduler": (("scheduler",), _FLOW_SCHEDULERS),
    },
}

#: Components a family's pipeline runs without when model_index.json lists them as
#: ``[null, null]`` (SD3 without its T5 encoder uses zeros in its place, as its pipeline does).
OPTIONAL_COMPONENTS: dict[str, tuple[str, ...]] = {"sd3": ("text_encoder_3", "tokenizer_3")}

#: Latent side length of Flux images when the transformer's config names none: FluxPipeline's
#: default (128 latents, i.e. 1024 px with Flux's 8× autoencoder).
FLUX_DEFAULT_LATENT_SIZE = 128

#: A folder holding this file is a LoRA model: {"base": model reference, "lora": path
#: relative to the folder, "scale": number (optional)}. It names a fine-tune by one reference,
#: as a registry entry or ``--model`` can.
LORA_MODEL_FILE = "lora_model.json"

#: A folder holding this file names a model published in parts, so that one reference (a
#: registry entry, ``--model``) covers it: {"checkpoint": FILE, "config": DIR} for a single-file
#: checkpoint and its configs, or {"base": model reference, "unet" or "transformer": FILE} for a
#: fine-tune published as its denoiser; either may add "resolution" (Flux). FILE and DIR are
#: paths inside the folder; "base" is a reference, or a path relative to the folder.
MODEL_FILE = "cdi_model.json"

#: Weight files whose loading unpickles (runs code from the file): refused unless allowed.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: Suffixes of weight files, in a folder or as a single-file checkpoint.
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
#: Families whose diffusers pipeline loads a single-file checkpoint (``from_single_file``).
SINGLE_FILE_FAMILIES: tuple[FamilyName, ...] = ("stable-diffusion", "stable-diffusion-xl", "sd3", "flux")
#: The components a family takes from one file beside its base's folder (``--unet FILE``,
#: ``--transformer FILE``): the denoisers whose classes diffusers loads with ``from_single_file``
#: (diffusers' own key names or the original checkpoint's).
COMPONENT_FILE_ROLES: dict[str, tuple[str, ...]] = {
    "stable-diffusion": ("unet",), "stable-diffusion-xl": ("unet",), "sd3": ("transformer",),
    "flux": ("transformer",),
}

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
    #: The diffusers pipeline class model_index.json names.
    pipeline: str = ""
    #: Components already loaded (role → module), from a single-file checkpoint.
    preloaded: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def resolve_reference(source: str, revision: str | None = None, config: str | None = None) -> ModelReference:
    """A local directory if ``source`` is one, a single-file checkpoint (with ``config``, a
    local folder of its configs) if it is a file, else a hub id (``owner/name``)."""
    if not source or not source.strip():
        raise ModelNotFoundError("the model reference is empty")
    path = Path(source).expanduser()
    if not path.exists() and "/" not in source:
        shipped = _zoo_path(source)
        if shipped is not None:
            path = shipped
    if path.is_file():
        return _single_file_reference(path, config)
    if config is not None:
        raise InputError(f"a config folder is given for {source}, but it is not a single-file checkpoint: "
                         "--config goes with a .safetensors file")
    if path.is_dir():
        return ModelReference(source=str(path.resolve()), revision=revision, is_local=True)
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return ModelReference(source=source, revision=revision, is_local=False)
    raise ModelNotFoundError(
        f"{source!r} is neither a local model directory, a checkpoint file nor a hub id of the form owner/name"
    )


def _single_file_reference(path: Path, config: str | None) -> ModelReference:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelNotFoundError(
            f"{path} is a file but not a checkpoint ({', '.join(WEIGHT_SUFFIXES)}); a model is a diffusers "
            "directory, a hub id or one checkpoint file")
    if config is None:
        raise MalformedModelError(
            f"{path} is a single-file checkpoint: give its configs with --config DIR (in Python: config=DIR), a "
            "diffusers folder of the same architecture (model_index.json, each component's config, the "
            "tokenizers and scheduler; no weights needed). Nothing is downloaded")
    folder = Path(config).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"the config folder {config} is not a directory")
    return ModelReference(source=str(path.resolve()), is_local=True, config=str(folder.resolve()))


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
    if role.startswith("tokenizer"):
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


def detect_family(source: str, revision: str | None = None, config: str | None = None,
                  components: dict[str, str] | None = None) -> ModelInfo:
    """Detect a model's family and check that the files its family needs are present.

    A single-file checkpoint's family is that of its ``config`` folder. ``components`` maps a
    component (``unet``, ``transformer``) to one weight file that replaces the base's folder
    of it: a fine-tune published as its denoiser alone.
    """
    if components:
        info = detect_family(source, revision, config)
        return dataclasses.replace(info, reference=dataclasses.replace(
            info.reference, components=_component_files(info, components)))
    ref = resolve_reference(source, revision, config)
    if ref.config is not None:
        info = detect_family(ref.config)
        if info.lora is not None:
            raise MalformedModelError(f"the config folder {ref.config} is a LoRA model, not a model's configs")
        if info.family not in SINGLE_FILE_FAMILIES:
            raise UnsupportedModelError(
                f"{ref.source}: single-file checkpoints of {info.pipeline} models are not supported "
                f"(supported: {', '.join(SINGLE_FILE_FAMILIES)}); convert it to a diffusers folder")
        return dataclasses.replace(info, reference=ref)
    if ref.is_local and (Path(ref.source) / LORA_MODEL_FILE).is_file():
        return _lora_model(ref)
    if ref.is_local and (Path(ref.source) / MODEL_FILE).is_file():
        return _described_model(ref)
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

    folders_of, classes, configs = _components(ref, index, family, pipeline)
    size, channels, conditioning, num_classes = _geometry(ref, family, configs, folders_of)

    return ModelInfo(
        reference=ref,
        family=family,
        components=folders_of,
        classes=classes,
        conditioning=conditioning,
        image_size=size,
        image_channels=channels,
        num_classes=num_classes,
        configs=configs,
        pipeline=pipeline,
    )


def _components(ref: ModelReference, index: dict[str, Any], family: FamilyName, pipeline: str,
                ) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, Any]]]:
    """Each component the family needs: its folder, its class (checked) and its config."""
    folders_of: dict[str, str] = {}
    classes: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    for role, (folders, accepted) in FAMILY_COMPONENTS[family].items():
        folder = next((f for f in folders if isinstance(index.get(f), list)), None)
        if folder is not None and index[folder] in ([None, None], [None]) \
                and role in OPTIONAL_COMPONENTS.get(family, ()):
            continue
        if folder is None:
            raise MalformedModelError(
                f"{ref.source}: model_index.json lists no {' or '.join(folders)} component "
                f"(needed by a {pipeline})"
            )
        entry = index[folder]
        declared = entry[1] if len(entry) == 2 and isinstance(entry[1], str) else None
        component_config = _component_config(ref, folder, role)
        cls = component_config.get("_class_name") or declared
        if role.startswith("tokenizer"):
            cls = declared or component_config.get("tokenizer_class")
        if not isinstance(cls, str):
            raise MalformedModelError(f"{ref.source}: cannot tell the class of component {folder}")
        if accepted and cls not in accepted:
            raise UnsupportedModelError(
                f"{ref.source}: component {folder} is a {cls}; a {family} model needs "
                f"{' or '.join(accepted)}"
            )
        folders_of[role] = folder
        classes[role] = cls
        configs[role] = component_config

    sched = configs["scheduler"]
    if "num_train_timesteps" not in sched and "trained_betas" not in sched:
        raise MalformedModelError(
            f"{ref.source}: scheduler config has neither num_train_timesteps nor trained_betas"
        )
    return folders_of, classes, configs


def _geometry(ref: ModelReference, family: FamilyName, configs: dict[str, dict[str, Any]],
              folders_of: dict[str, str]) -> tuple[int, int, Conditioning, int | None]:
    """The model's image size, channels, conditioning and class count, from its configs."""
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
            where = f"{ref.source}/{folders_of['autoencoder']}/config.json"
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
        denoiser = "unet" if "unet" in configs else "transformer"
        ae = configs["autoencoder"]
        where = f"{ref.source}/{denoiser}/config.json"
        if family == "flux" and "sample_size" not in configs[denoiser]:
            size = FLUX_DEFAULT_LATENT_SIZE
        else:
            size = _int(configs[denoiser], "sample_size", where)
        size *= 2 ** (len(ae.get("block_out_channels") or [0]) - 1)
        channels = _int(ae, "in_channels", f"{ref.source}/vae/config.json")
        conditioning = "text"
    if channels not in (1, 3):
        raise UnsupportedModelError(f"{ref.source}: models with {channels} image channels are not supported")
    return size, channels, conditioning, num_classes


def _component_files(info: ModelInfo, components: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Check each ``role → file`` given for ``info``'s model; the (folder, resolved file) pairs."""
    where = info.reference.source
    if info.reference.is_single_file:
        raise InputError(f"{where} is a single-file checkpoint already; a component file goes with a base folder")
    if info.lora is not None:
        raise InputError(f"{where} is a LoRA model; a component file goes with the base model itself")
    if info.reference.components:
        raise InputError(f"{where} names its component files already")
    allowed = COMPONENT_FILE_ROLES.get(info.family, ())
    out: list[tuple[str, str]] = []
    for role, file in sorted(components.items()):
        if role not in allowed:
            flags = ", ".join(f"--{r}" for r in allowed) or "none"
            raise InputError(f"a {info.family} model takes no {role} file (component files it takes: {flags})")
        path = Path(file).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"the {role} file {file} does not exist or is not a file")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ModelNotFoundError(f"the {role} file {file} is not a weight file ({', '.join(WEIGHT_SUFFIXES)})")
        out.append((info.components[role], str(path.resolve())))
    return tuple(out)


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


def _inside(ref: ModelReference, spec: dict[str, Any], key: str, where: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise MalformedModelError(f"{where}: {key!r} must be a path inside the folder")
    path = Path(ref.source) / value
    if not path.exists():
        raise MalformedModelError(f"{ref.source}: missing {value}")
    return str(path)


def _described_model(ref: ModelReference) -> ModelInfo:
    """A folder naming a model published in parts (:data:`MODEL_FILE`)."""
    spec = read_json(ref, MODEL_FILE)
    where = f"{ref.source}/{MODEL_FILE}"
    roles = ("unet", "transformer")
    unknown = sorted(set(spec) - {"checkpoint", "config", "base", "resolution", *roles})
    if unknown:
        raise MalformedModelError(f"{where}: unknown entries {', '.join(unknown)}")
    if "checkpoint" in spec:
        if "base" in spec or any(r in spec for r in roles):
            raise MalformedModelError(f"{where}: a checkpoint goes with 'config', not with 'base' or a component file")
        info = detect_family(_inside(ref, spec, "checkpoint", where), config=_inside(ref, spec, "config", where))
    else:
        base = spec.get("base")
        if not isinstance(base, str) or not base:
            raise MalformedModelError(f"{where}: name a 'checkpoint' with its 'config', or a 'base' model")
        files = {r: _inside(ref, spec, r, where) for r in roles if r in spec}
        if not files:
            raise MalformedModelError(f"{where}: a 'base' goes with a 'unet' or 'transformer' file")
        base_path = Path(ref.source) / base
        info = detect_family(str(base_path) if base_path.is_dir() else base, components=files)
    if info.lora is not None:
        raise MalformedModelError(f"{where}: the base is a LoRA model")
    resolution = spec.get("resolution")
    return info if resolution is None else at_resolution(info, resolution)


def at_resolution(info: ModelInfo, resolution: object) -> ModelInfo:
    """``info`` audited at ``resolution`` pixels per side (Flux only: its pipeline generates at
    any resolution and shifts σ for it; other families are audited at their config's)."""
    if info.family != "flux":
        raise InputError(f"a resolution applies to Flux models; a {info.family} model is audited at its "
                         f"config's resolution ({info.image_size} px)")
    step = 2 ** len(info.configs["autoencoder"].get("block_out_channels") or [0])  # 2×2-packed latents
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < step or resolution % step:
        raise InputError(f"the resolution must be a positive multiple of {step} pixels for this model, "
                         f"got {resolution!r}")
    if resolution == info.image_size:
        return info
    return dataclasses.replace(info, image_size=resolution,
                               reference=dataclasses.replace(info.reference, resolution=resolution))
