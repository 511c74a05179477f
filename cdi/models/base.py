"""The interface every model family is reduced to (method §3)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch

from cdi.models.schedule import NoiseSchedule

Conditioning = Literal["none", "class", "text"]
#: What one image contributes as conditioning: nothing, a class id, or a caption.
ImageCondition = int | str | None


#: The model families, named once: the detection tables, the adapters and the reports use these.
FamilyName = Literal["pixel", "latent", "dit", "stable-diffusion", "stable-diffusion-xl", "sd3", "flux"]
FAMILIES: tuple[FamilyName, ...] = get_args(FamilyName)


@dataclass(frozen=True)
class ModelReference:
    """Where a model comes from: a local diffusers directory, a hub id plus revision, or one
    single-file checkpoint with a local folder of its configs (``config``)."""

    source: str
    revision: str | None = None
    is_local: bool = True
    #: For a single-file checkpoint: the diffusers folder whose configs describe it.
    config: str | None = None
    #: Components taken from one file each instead of the model's folder: (folder, file) pairs,
    #: e.g. (("unet", "/models/fine-tune.safetensors"),) for a fine-tune published as its UNet.
    components: tuple[tuple[str, str], ...] = ()
    #: The image side the model is audited at where it is not its config's (Flux, which
    #: generates at any resolution: its σ shift depends on it).
    resolution: int | None = None

    @property
    def is_single_file(self) -> bool:
        return self.config is not None


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the exact weights: reference, family and the SHA-256 of each weight file."""

    reference: ModelReference
    family: str
    weight_sha256: dict[str, str] = field(default_factory=dict)
    #: A LoRA applied on top of the weights: SHA-256 of each of its files, and its scale.
    lora_sha256: dict[str, str] = field(default_factory=dict)
    lora_scale: float | None = None

    @property
    def digest(self) -> str:
        """One SHA-256 over the sorted weight hashes (and a LoRA's, with its scale): the
        model's identity for caches."""
        import hashlib

        h = hashlib.sha256(self.family.encode())
        for name in sorted(self.weight_sha256):
            h.update(f"\0{name}\0{self.weight_sha256[name]}".encode())
        if self.reference.resolution is not None:
            h.update(f"\0resolution\0{self.reference.resolution}".encode())
        if self.lora_sha256:
            h.update(f"\0lora\0{float(self.lora_scale or 0.0)!r}".encode())
            for name in sorted(self.lora_sha256):
                h.update(f"\0{name}\0{self.lora_sha256[name]}".encode())
        return h.hexdigest()


class DiffusionAdapter(abc.ABC):
    """A diffusion model seen as CDI needs it.

    Subclasses set the attributes below in ``__init__``, freeze every parameter
    (``requires_grad_(False)``) and put every network in ``eval()`` mode.
    """

    family: ClassVar[FamilyName]

    #: (a_t, s_t) for t = 0 … T−1 and how the network's output becomes ε̂ (method §10.1),
    #: from the model's own scheduler config.
    schedule: NoiseSchedule
    conditioning: Conditioning
    #: Channels and side length of the images the model takes (after preprocessing).
    image_channels: int
    image_size: int
    device: torch.device
    dtype: torch.dtype
    identity: ModelIdentity

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] to the model's z0 (identity for pixel models).

        Deterministic: the posterior mean (KL) or the pre-quantisation output (VQ).
        """

    def condition(self, conditions: Sequence[ImageCondition],
                  original_sizes: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor | None:
        """Turn one condition per image into the batch conditioning passed to :meth:`eps`.

        Returns ``None`` for unconditional models, class ids ``[B]`` (long) for
        class-conditional ones, and text-encoder states ``[B, L, D]`` for text models
        (models that take several text inputs, such as SDXL's pooled embedding, get them
        flattened side by side, ``[B, N]``). The first dimension is always the batch, so a
        batch's conditioning can be indexed and concatenated.

        ``original_sizes`` (height, width) of each image before preprocessing: SDXL is
        conditioned on it; ``None`` (or an entry ``None``) means the model's own resolution.
        """
        return None

    @abc.abstractmethod
    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The noise prediction ε̂(z_t, t) for a batch, float32, same shape as ``z_t``.

        ``t`` is one index into the grid of :attr:`schedule` for the whole batch or a long
        tensor ``[B]``, one per sample; z_t = a_t·z0 + s_t·ε. Whatever the network predicts
        (ε, v, x0 or a flow velocity) comes back as ε̂ (:meth:`NoiseSchedule.to_eps`).

        Differentiable with respect to ``z_t``; the parameters are frozen.
        """

    def describe(self, timesteps: Sequence[int] = ()) -> dict[str, object]:
        """Facts for the report; for flow models, the σ of each grid index in ``timesteps``."""
        return {
            "family": self.family,
            "conditioning": self.conditioning,
            "image_channels": self.image_channels,
            "image_size": self.image_size,
            "num_train_timesteps": self.num_train_timesteps,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            **self.schedule.describe(tuple(timesteps)),
            **({"lora": self.lora.describe()} if self.lora is not None else {}),
            **({"config": self.identity.reference.config} if self.identity.reference.config else {}),
            **({"component_files": dict(self.identity.reference.components)}
               if self.identity.reference.components else {}),
        }

    #: The LoRA applied to the weights, if any (:class:`cdi.models.lora.LoraIdentity`).
    lora: Any = None

