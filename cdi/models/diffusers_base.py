"""What every diffusers-backed adapter shares: schedule, identity, dtype and output type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cdi.errors import InputError, UnsupportedModelError
from cdi.models.base import DiffusionAdapter, ImageCondition
from cdi.models.detect import ModelInfo
from cdi.models.loading import alphas_cumprod_of, identity_of, load_component, prediction_type_of
from cdi.models.schedule import NoiseSchedule


class DiffusersAdapter(DiffusionAdapter):
    """Base of the adapters built from a detected :class:`ModelInfo`."""

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype
        self.schedule = self._schedule(info)
        self.conditioning = info.conditioning
        self.image_channels = info.image_channels
        self.image_size = info.image_size
        self.identity = identity_of(info)
        self._num_classes = info.num_classes

    def _schedule(self, info: ModelInfo) -> NoiseSchedule:
        """The model's (a_t, s_t): DDPM-style ᾱ_t unless the family says otherwise."""
        self.alphas_cumprod = alphas_cumprod_of(info)
        return NoiseSchedule.ddpm(self.alphas_cumprod, prediction_type_of(info))

    #: The key prefix of the denoiser's weights in a diffusers LoRA file.
    lora_prefix = "unet"
    #: The text encoders the family's pipeline loads a LoRA file's text-encoder weights into.
    lora_text_encoders: tuple[str, ...] = ()
    #: Whether the family's pipeline encodes images with the autoencoder in float32 whenever
    #: its config sets ``force_upcast`` (SDXL's autoencoder overflows in float16).
    vae_force_upcast = False

    def autoencoder_dtype(self, info: ModelInfo, dtype: torch.dtype) -> torch.dtype:
        """The dtype the family's pipeline runs the autoencoder's encoder in."""
        if self.vae_force_upcast and info.configs["autoencoder"].get("force_upcast", True):
            return torch.float32
        return dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network a LoRA adapts: the UNet or the transformer."""
        net: torch.nn.Module | None = getattr(self, "unet", None) or getattr(self, "transformer", None)
        if net is None:
            raise NotImplementedError(f"{type(self).__name__} has no denoiser")
        return net

    def lora_pipeline_class(self) -> Any:
        """The diffusers pipeline whose ``load_lora_weights`` loads this family's LoRA files."""
        return None

    def as_pipeline(self) -> Any:
        """This family's pipeline around the adapter's own modules (a LoRA loaded through it
        lands in them), with the model's scheduler; the parts the audit never runs are None."""
        import inspect

        cls = self.lora_pipeline_class()
        if cls is None:
            raise UnsupportedModelError(f"{type(self.denoiser).__name__} takes no LoRA file; give a peft folder")
        own = {"vae": getattr(self, "autoencoder", None), "scheduler": load_component(self.info, "scheduler")}
        kwargs: dict[str, Any] = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name == "requires_safety_checker":
                kwargs[name] = False
            elif name in own:
                kwargs[name] = own[name]
            else:
                kwargs[name] = getattr(self, name, None)
        return cls(**kwargs)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction

    def _timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.to(self.device, torch.long).expand(batch) if t.dim() == 0 else t.to(self.device, torch.long)
        return torch.full((batch,), int(t), dtype=torch.long, device=self.device)

    def _to_eps(self, out: torch.Tensor, z_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Convert the network's output to a noise prediction, in float32."""
        return self.schedule.to_eps(out, z_t, self._timesteps(t, z_t.shape[0]))

    def _model_timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        """What the network receives for grid indices ``t``: float ``[B]`` on the device."""
        idx = self._timesteps(t, batch).cpu()
        return self.schedule.model_timesteps[idx].to(self.device, torch.float32)

    def condition(self, conditions: Sequence[ImageCondition],
                  original_sizes: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor | None:
        if self.conditioning == "none":
            return None
        if self.conditioning != "class":
            raise NotImplementedError
        labels: list[int] = []
        for c in conditions:
            if isinstance(c, bool) or not isinstance(c, int):
                raise InputError(f"a class-conditional model needs an integer class label per image, got {c!r}")
            if self._num_classes is not None and not 0 <= c < self._num_classes:
                raise InputError(f"class label {c} is outside 0…{self._num_classes - 1}")
            labels.append(c)
        return torch.tensor(labels, dtype=torch.long, device=self.device)
