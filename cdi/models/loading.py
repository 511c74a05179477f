"""Loading a model's components through diffusers' own ``from_pretrained``.

Local directories and hub ids go through the same calls; only where the files live differs.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from cdi.errors import (
    MalformedModelError,
    ModelError,
    ModelIdentityError,
    ModelNotDownloadedError,
    ModelNotFoundError,
    PickledWeightsError,
    UnsupportedModelError,
)
from cdi.models.base import ModelIdentity
from cdi.models.detect import PICKLE_SUFFIXES, WEIGHT_SUFFIXES, ModelInfo
from cdi.models.schedule import DDPM_PREDICTIONS, Parameterisation

#: The environment variable that allows pickled weights, as ``--allow-pickle`` does.
ALLOW_PICKLE_ENV = "CDI_ALLOW_PICKLE"
#: Components that hold no weights.
_NO_WEIGHTS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


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
    A single-file checkpoint is refused if it is a pickle, and so is its config folder if it
    holds pickled weights only: diffusers loads a component the file lacks from that folder.
    """
    if info.allow_pickle:
        return
    replaced = dict(info.reference.components)
    pickled_files = [Path(f).name for f in replaced.values() if Path(f).suffix.lower() in PICKLE_SUFFIXES]
    if pickled_files:
        raise refuse_pickle(pickled_files, "component file")
    if not info.reference.is_local:
        return
    if info.reference.is_single_file:
        file = Path(info.reference.source)
        if file.suffix.lower() in PICKLE_SUFFIXES:
            raise refuse_pickle([file.name], str(file.parent))
    root = Path(info.reference.config or info.reference.source)
    pickled: list[str] = []
    for role, folder in info.components.items():
        if role in _NO_WEIGHTS or folder in replaced or not (root / folder).is_dir():
            continue
        files = [p for p in (root / folder).rglob("*") if p.is_file()]
        if not any(p.suffix == ".safetensors" for p in files):
            pickled += [p.relative_to(root).as_posix() for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise refuse_pickle(sorted(pickled), str(root))


def load_component(info: ModelInfo, role: str, dtype: torch.dtype | None = None) -> Any:
    """Instantiate one component (``unet``, ``autoencoder``, ``text_encoder``, …) of a model."""
    import diffusers
    import transformers

    if role in info.preloaded:
        module = info.preloaded[role]
        if dtype is not None and isinstance(module, torch.nn.Module) and role not in _NO_WEIGHTS:
            module = module.to(dtype)  # SDXL's autoencoder, upcast as its pipeline upcasts it
        return module
    folder = info.components[role]
    cls_name = info.classes[role]
    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name, None)
    if cls is None:
        raise MalformedModelError(f"{info.reference.source}: unknown component class {cls_name}")
    ref = info.reference
    if ref.is_single_file:
        raise MalformedModelError(f"{ref.source}: the checkpoint holds no {folder} (load it with load_single_file)")
    file = dict(ref.components).get(folder)
    if file is not None:
        return _component_from_file(info, role, cls, Path(file), dtype)
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


def _component_from_file(info: ModelInfo, role: str, cls: Any, file: Path, dtype: torch.dtype | None) -> Any:
    """One component from one weight file, configured by the base's folder of it: diffusers'
    ``from_single_file`` (the file in diffusers' key names or the original checkpoint's)."""
    check_weight_files(info)
    ref = info.reference
    folder = info.components[role]
    if not hasattr(cls, "from_single_file"):
        raise UnsupportedModelError(f"a {cls.__name__} cannot be loaded from one file")
    kwargs: dict[str, Any] = {"config": ref.source, "subfolder": folder, "local_files_only": True}
    if ref.revision is not None:
        kwargs["revision"] = ref.revision
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        module = cls.from_single_file(str(file), **kwargs)
    except Exception as exc:  # diffusers raises many types for a file that does not fit the config
        raise MalformedModelError(
            f"{file}: cannot load it as the {folder} of {ref.source} ({type(exc).__name__}: {exc})") from None
    module.eval()
    module.requires_grad_(False)
    return module


def load_single_file(info: ModelInfo, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Every component of a single-file checkpoint, role → module, through the pipeline's own
    ``from_single_file`` with the configs of ``info.reference.config`` (never downloading)."""
    import diffusers

    ref = info.reference
    if ref.config is None:
        raise ValueError("not a single-file checkpoint")
    check_weight_files(info)
    cls = getattr(diffusers, info.pipeline, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise UnsupportedModelError(f"{ref.source}: {info.pipeline} cannot load a single-file checkpoint")
    kwargs: dict[str, Any] = {"config": ref.config, "local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = cls.from_single_file(ref.source, **kwargs)
    except Exception as exc:  # diffusers raises many types for a file that does not fit the configs
        raise MalformedModelError(
            f"{ref.source}: cannot load it as a {info.pipeline} with the configs in {ref.config} "
            f"({type(exc).__name__}: {exc})") from None
    out: dict[str, Any] = {}
    for role, folder in info.components.items():
        module = getattr(pipe, folder, None)
        if module is None:
            raise MalformedModelError(f"{ref.source}: the checkpoint and {ref.config} give no {folder}")
        if isinstance(module, torch.nn.Module):
            module.eval()
            module.requires_grad_(False)
        out[role] = module
    return out


def alphas_cumprod_of(info: ModelInfo) -> torch.Tensor:
    """ᾱ_t of the model's own scheduler, float64 on the CPU."""
    scheduler = load_component(info, "scheduler")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ModelError(
            f"{info.reference.source}: scheduler {type(scheduler).__name__} exposes no alphas_cumprod"
        )
    return torch.as_tensor(alphas, dtype=torch.float64).cpu()


def prediction_type_of(info: ModelInfo) -> Parameterisation:
    value = info.configs["scheduler"].get("prediction_type", "epsilon")
    for prediction in DDPM_PREDICTIONS:
        if value == prediction:
            return prediction
    raise MalformedModelError(f"{info.reference.source}: unknown prediction_type {value!r}")


#: The environment variable that lets a hub model's missing weights be downloaded when it is
#: loaded (by default only the local Hugging Face cache is read).
ALLOW_DOWNLOAD_ENV = "CDI_ALLOW_DOWNLOAD"


def download_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def _model_files_root(info: ModelInfo) -> Path:
    """The folder holding the model's files: the local directory, or the hub model's snapshot
    in the local cache (downloaded first only with ``CDI_ALLOW_DOWNLOAD=1``)."""
    ref = info.reference
    if ref.is_local:
        return Path(ref.source)
    from huggingface_hub import snapshot_download

    patterns = [f"{folder}/*" for role, folder in info.components.items() if folder not in dict(ref.components)]
    allow = download_allowed()
    try:
        return Path(snapshot_download(ref.source, revision=ref.revision, allow_patterns=patterns,
                                      local_files_only=not allow))
    except Exception as exc:  # the hub client raises many types (offline, not cached, no such revision)
        if allow:
            raise ModelNotFoundError(f"cannot download {ref.source}@{ref.revision or 'main'}: {exc}") from None
        raise not_downloaded(info) from None


def not_downloaded(info: ModelInfo, folders: list[str] | None = None) -> ModelNotDownloadedError:
    ref = info.reference
    rev = f" --revision {ref.revision}" if ref.revision else ""
    what = f"the weights of {', '.join(folders)}" if folders else "its files"
    return ModelNotDownloadedError(
        f"{ref.source}@{ref.revision or 'main'} is a hub model and {what} are not in the local Hugging Face "
        f"cache: nothing is downloaded while auditing. Download it first (`hf download {ref.source}{rev}`, "
        f"or huggingface_hub.snapshot_download), or set {ALLOW_DOWNLOAD_ENV}=1 to let the audit download it")


#: (resolved path, size, mtime in ns) → SHA-256: each weight file is read once per process.
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of one file, read once per process while its size and modification time stay
    the same; a file that cannot be read is a :class:`ModelIdentityError`."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
        key = (str(resolved), stat.st_size, stat.st_mtime_ns)
        if key in _HASHES:
            return _HASHES[key]
        h = hashlib.sha256()
        with resolved.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise ModelIdentityError(f"cannot hash {path}: {exc.strerror or exc}") from None
    _HASHES[key] = h.hexdigest()
    return _HASHES[key]


#: ``diffusion_pytorch_model.fp16.safetensors``, ``model.bf16-00001-of-00002.safetensors``: a
#: variant, which diffusers and transformers load only when asked for it (the audit never asks).
_VARIANT = re.compile(r"^[^.]+\.[A-Za-z0-9_]+(-\d+-of-\d+)?\.(safetensors|bin|ckpt|pt|pth)$")


def loaded_weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files ``from_pretrained`` reads in one component folder: not the variants
    (``*.fp16.safetensors``), and the ``.safetensors`` files where there are any (pickled
    weights beside them are never loaded)."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not _VARIANT.match(p.name))
    safe = [p for p in files if p.suffix == ".safetensors"]
    if safe or not allow_pickle:
        return safe or [p for p in files if p.suffix in PICKLE_SUFFIXES]
    return files


def weight_hashes(info: ModelInfo) -> dict[str, str]:
    """SHA-256 of every weight file the model loads, keyed by relative path (a component
    taken from its own file: ``folder:file name``).

    Raises :class:`ModelIdentityError` when the files cannot be read,
    :class:`ModelNotDownloadedError` for a hub model whose weights are not in the local cache,
    and :class:`MalformedModelError` when a component that holds weights has none: a model is
    never given an empty identity (two different models would share a feature-cache key).
    """
    if info.reference.is_single_file:
        # The file, and any weights in the config folder: diffusers' single-file loader may
        # take a component the file lacks from there.
        file = Path(info.reference.source)
        hashes = {file.name: file_sha256(file)}
        config = Path(str(info.reference.config))
        for folder in sorted(set(info.components.values())):
            base = config / folder
            for path in sorted(base.rglob("*")) if base.is_dir() else []:
                if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                    hashes["config/" + path.relative_to(config).as_posix()] = file_sha256(path)
        return hashes
    replaced = dict(info.reference.components)
    root = _model_files_root(info)
    out: dict[str, str] = {}
    missing: list[str] = []
    for role, folder in sorted(info.components.items()):
        if folder in replaced:
            file = Path(replaced[folder])
            out[f"{folder}:{file.name}"] = file_sha256(file)
            continue
        files = loaded_weight_files(root / folder, info.allow_pickle)
        if not files and role not in _NO_WEIGHTS:
            missing.append(folder)
        for path in files:
            out[path.relative_to(root).as_posix()] = file_sha256(path)
    if missing and not info.reference.is_local:
        raise not_downloaded(info, missing)
    if missing:
        raise MalformedModelError(f"{info.reference.source}: cannot load {missing[0]} (it has no weight file)")
    return out


def identity_of(info: ModelInfo) -> ModelIdentity:
    return ModelIdentity(reference=info.reference, family=info.family, weight_sha256=weight_hashes(info))
