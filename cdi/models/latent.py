"""Latent diffusion: a VQ or KL autoencoder plus a ``UNet2DModel`` in its latent space."""

from __future__ import annotations

import torch

from cdi.models.detect import ModelInfo
from cdi.models.diffusers_base import DiffusersAdapter
from cdi.models.loading import load_component


class LatentAdapter(DiffusersAdapter):
    family = "latent"

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        self.autoencoder = load_component(info, "autoencoder", dtype).to(self.device)
        self.unet = load_component(info, "unet", dtype).to(self.device)
        self.is_vq = info.classes["autoencoder"] == "VQModel"
        # diffusers' LDMPipeline feeds VQ latents to the UNet unscaled; KL latents are scaled
        # by the autoencoder's scaling_factor, as in every KL pipeline.
        self.scaling_factor = 1.0 if self.is_vq else float(
            self.autoencoder.config.get("scaling_factor", 1.0)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        z: torch.Tensor
        if self.is_vq:
            z = self.autoencoder.encode(x).latents  # pre-quantisation output
        else:
            z = self.autoencoder.encode(x).latent_dist.mean  # posterior mean, never a sample
        return (z * self.scaling_factor).float()

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        out = self.unet(
            z_t.to(self.dtype), self._timesteps(t, z_t.shape[0]), class_labels=cond
        ).sample
        return self._to_eps(out, z_t, t)
