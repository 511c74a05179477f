"""Model adapters: every supported diffusion family reduced to one interface (method §3).

:func:`load_model` imports torch and diffusers; :mod:`cdi.models.detect` does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdi.models.base import DiffusionAdapter, ImageCondition, ModelIdentity, ModelReference
from cdi.models.detect import ModelInfo, at_resolution, detect_family, resolve_reference

if TYPE_CHECKING:
    import torch

__all__ = [
    "DiffusionAdapter",
    "ImageCondition",
    "ModelIdentity",
    "ModelInfo",
    "ModelReference",
    "detect_family",
    "load_model",
    "resolve_reference",
]


def load_model(
    source: str,
    revision: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    allow_pickle: bool | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    config: str | None = None,
    components: dict[str, str] | None = None,
    resolution: int | None = None,
) -> DiffusionAdapter:
    """Load a model directory or hub id as the adapter of its family.

    ``dtype`` defaults to float32; ``"float16"``/``"bfloat16"`` are accepted as strings.
    Shipped test models can be named by their zoo name (see ``cdi models``). Pickled
    weights are refused unless ``allow_pickle`` (default: ``CDI_ALLOW_PICKLE=1``).
    ``lora`` (a file, a folder or a shipped LoRA's name) is loaded onto the denoiser at
    ``lora_scale``; the identity then names the base's weights and the LoRA's.

    ``source`` may also be one single-file checkpoint (``.safetensors`` as published on
    model-sharing sites; ``.ckpt``/``.bin``/``.pt`` only with ``allow_pickle``): ``config`` is
    then a local diffusers folder of its architecture's configs, and the identity is the
    file's SHA-256.

    ``components`` takes a component from one weight file instead of the base's folder:
    ``{"unet": FILE}`` (SD 1.x/2.x, SDXL) or ``{"transformer": FILE}`` (SD3, Flux), the file in
    diffusers' key names or the original checkpoint's, as fine-tunes are published; the
    identity then names the file and the base's other weights.

    ``resolution`` audits a Flux model at that image side (pixels) instead of its config's
    (FluxPipeline's default, 1024): the images are resized to it and σ is shifted for it.
    """
    import dataclasses

    import torch

    from cdi.errors import InputError
    from cdi.models.diffusers_base import DiffusersAdapter
    from cdi.models.dit import DiTAdapter
    from cdi.models.flux import FluxAdapter
    from cdi.models.latent import LatentAdapter
    from cdi.models.loading import pickle_allowed
    from cdi.models.pixel import PixelAdapter
    from cdi.models.sd3 import SD3Adapter
    from cdi.models.stable_diffusion import StableDiffusionAdapter
    from cdi.models.stable_diffusion_xl import StableDiffusionXLAdapter

    resolved_dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    info = dataclasses.replace(detect_family(source, revision, config, components),
                               allow_pickle=pickle_allowed(allow_pickle))
    if resolution is not None:
        info = at_resolution(info, resolution)
    if info.reference.is_single_file:
        from cdi.models.loading import load_single_file

        info = dataclasses.replace(info, preloaded=load_single_file(info, resolved_dtype))
    # Each adapter names its family (``family``); one adapter per family.
    adapters: dict[str, type[DiffusersAdapter]] = {cls.family: cls for cls in (
        PixelAdapter, LatentAdapter, DiTAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter, SD3Adapter,
        FluxAdapter)}
    if lora is not None and info.lora is not None:
        raise InputError(f"{source} is a LoRA model already; --lora adds a LoRA to a base model")
    if info.lora is not None:
        lora, lora_scale = info.lora, info.lora_scale
    adapter = adapters[info.family](info, device=device, dtype=resolved_dtype)
    if lora is not None:
        from cdi.models.lora import apply_lora

        applied = apply_lora(adapter, lora, lora_scale, allow_pickle=info.allow_pickle)
        adapter.lora = applied
        adapter.identity = dataclasses.replace(
            adapter.identity, lora_sha256=dict(applied.sha256), lora_scale=applied.scale)
    return adapter


