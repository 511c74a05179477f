"""PIA and PIAN: the model's own ε̂(z0, 0) as the noise, pushed to timestep t."""

from __future__ import annotations

import math

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import BatchContext
from cdi.features.secmi import z0_key


def _l5(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(p=5, dim=1)


def _proximal_error(ctx: BatchContext, key: str, eps0: torch.Tensor, t: int) -> torch.Tensor:
    x = ctx.q(t, eps0)
    return _l5(eps0 - ctx.eps((key, t), x, t))[:, None]


def pia(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """PIA ``[B, 1]``: ‖ε0 − ε̂(√ᾱ_t·z0 + √(1−ᾱ_t)·ε0, t)‖₅ with ε0 = ε̂(z0, 0)."""
    eps0 = ctx.eps(z0_key(), ctx.z0, 0)
    return _proximal_error(ctx, "pia", eps0, cfg.pia_t)


def normalise_noise(eps0: torch.Tensor) -> torch.Tensor:
    """ε0 rescaled per sample to mean absolute value √(2/π), that of a standard normal."""
    n = eps0[0].numel()
    l1 = eps0.flatten(1).abs().sum(dim=1).clamp_min(torch.finfo(eps0.dtype).tiny)
    return eps0 * (n * math.sqrt(2.0 / math.pi) / l1).view(-1, *([1] * (eps0.dim() - 1)))


def pian(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """PIAN ``[B, 1]``: PIA with ε0 normalised by :func:`normalise_noise`."""
    eps0 = normalise_noise(ctx.eps(z0_key(), ctx.z0, 0))
    return _proximal_error(ctx, "pian", eps0, cfg.pia_t)
