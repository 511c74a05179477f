"""Pixel-space DDPM: a ``UNet2DModel`` denoising the image itself."""

from __future__ import annotations

import torch

from cdi.models.detect import ModelInfo
from cdi.models.diffusers_base import DiffusersAdapter
from cdi.models.loading import load_component


class PixelAdapter(DiffusersAdapter):
    family = "pixel"

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        self.unet = load_component(info, "unet", dtype).to(self.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32)

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        out = self.unet(
            z_t.to(self.dtype), self._timesteps(t, z_t.shape[0]), class_labels=cond
        ).sample
        return self._to_eps(out, z_t, t)
