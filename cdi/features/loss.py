"""Loss-type features: the denoising loss (DL) and the multiple loss (ML) over timesteps."""

from __future__ import annotations

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import BatchContext, l2


def shared_noise_key(t: int) -> tuple[str, int]:
    """Key of the call ε̂(q(z0, t, ε_shared), t), common to ML, GM and NO."""
    return ("shared", t)


def denoising_loss(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """DL ``[B, 1]``: mean over r of ‖ε̂(q(z0,t,ε_r),t) − ε_r‖₂ with fresh ε_r."""
    t = cfg.dl_t
    losses = []
    for r in range(cfg.dl_repeats):
        noise = ctx.noise.dl[r]
        losses.append(l2(ctx.eps(("dl", r), ctx.q(t, noise), t) - noise))
    return torch.stack(losses, dim=1).mean(dim=1, keepdim=True)


def multiple_loss(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """ML ``[B, len(T)]``: ‖ε̂(q(z0,t,ε),t) − ε‖₂ for each t, with the shared ε."""
    noise = ctx.noise.shared
    cols = [
        l2(ctx.eps(shared_noise_key(t), ctx.q(t, noise), t) - noise) for t in cfg.gm_timesteps
    ]
    return torch.stack(cols, dim=1)
