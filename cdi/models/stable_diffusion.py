"""Stable Diffusion 1.x/2.x: text-conditional UNet with a CLIP text encoder and a KL autoencoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from cdi.errors import InputError
from cdi.models.base import FamilyName, ImageCondition
from cdi.models.detect import ModelInfo
from cdi.models.diffusers_base import DiffusersAdapter
from cdi.models.loading import load_component
from cdi.models.text import captions_of, clip_states


class StableDiffusionAdapter(DiffusersAdapter):
    family: ClassVar[FamilyName] = "stable-diffusion"
    lora_text_encoders: tuple[str, ...] = ("text_encoder",)

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        self.autoencoder = load_component(info, "autoencoder", self.autoencoder_dtype(info, dtype)).to(self.device)
        self.unet = load_component(info, "unet", dtype).to(self.device)
        self.text_encoder = load_component(info, "text_encoder", dtype).to(self.device)
        self.tokenizer = load_component(info, "tokenizer")
        self.scaling_factor = float(self.autoencoder.config.get("scaling_factor", 1.0))

    def lora_pipeline_class(self) -> object:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean, scaled in the model's dtype, as the img2img pipelines compute it:
        the image cast to the model's dtype, then (SDXL's upcast autoencoder) to float32."""
        z: torch.Tensor = self.autoencoder.encode(
            x.to(self.device, self.dtype).to(self.autoencoder.dtype)).latent_dist.mean
        return (z.to(self.dtype) * self.scaling_factor).float()

    def condition(self, conditions: Sequence[ImageCondition],
                  original_sizes: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """CLIP text-encoder states ``[B, L, D]`` of each image's caption ("" when it has none)."""
        states, _ = clip_states(self.tokenizer, self.text_encoder, captions_of(conditions), self.device,
                                penultimate=False)
        return states

    def _unet_inputs(self, cond: torch.Tensor) -> dict[str, Any]:
        """The UNet's conditioning arguments from a batch of :meth:`condition`'s output."""
        return {"encoder_hidden_states": cond.to(self.dtype)}

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise InputError("a text-conditional model needs text-encoder states")
        out = self.unet(z_t.to(self.dtype), self._timesteps(t, z_t.shape[0]), **self._unet_inputs(cond)).sample
        return self._to_eps(out, z_t, t)
