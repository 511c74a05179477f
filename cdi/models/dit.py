"""DiT: a class-conditional transformer denoiser in a KL autoencoder's latent space."""

from __future__ import annotations

import torch

from cdi.models.detect import ModelInfo
from cdi.models.diffusers_base import DiffusersAdapter
from cdi.models.loading import load_component


class DiTAdapter(DiffusersAdapter):
    family = "dit"
    lora_prefix = "transformer"

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        self.autoencoder = load_component(info, "autoencoder", dtype).to(self.device)
        self.transformer = load_component(info, "transformer", dtype).to(self.device)
        self.scaling_factor = float(self.autoencoder.config.get("scaling_factor", 1.0))
        self.latent_channels = int(self.transformer.config.in_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.autoencoder.encode(x.to(self.device, self.dtype)).latent_dist.mean
        return (z * self.scaling_factor).float()

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        out = self.transformer(
            z_t.to(self.dtype), timestep=self._timesteps(t, z_t.shape[0]), class_labels=cond
        ).sample
        # Learned-sigma DiTs predict [ε, variance]: keep only the noise channels.
        return self._to_eps(out[:, : self.latent_channels], z_t, t)
