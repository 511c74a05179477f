"""SecMI's statistic: the error of one DDIM step forth and back after deterministic inversion."""

from __future__ import annotations

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import BatchContext, l2


def z0_key() -> tuple[str, int]:
    """Key of the call ε̂(z0, 0), common to SecMI's first inversion step and PIA."""
    return ("z0", 0)


def ddim_step(ctx: BatchContext, z: torch.Tensor, eps: torch.Tensor, s: int, s_next: int) -> torch.Tensor:
    """One deterministic DDIM step from timestep s to s′ given e = ε̂(z, s) (either direction)."""
    a, a_next = ctx.alpha_bar(s), ctx.alpha_bar(s_next)
    x0 = (z - (1.0 - a) ** 0.5 * eps) / a**0.5
    return a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps


def secmi_stat(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """SecMI_stat ``[B, 1]``: ‖z_det − z_step‖₂ (method §4, idx 1)."""
    t, s = cfg.secmi_t, cfg.secmi_step
    z = ctx.z0
    for k in range(0, t, s):
        key = z0_key() if k == 0 else ("secmi", k)
        z = ddim_step(ctx, z, ctx.eps(key, z, k), k, k + s)
    z_det = z
    z_up = ddim_step(ctx, z_det, ctx.eps(("secmi", t), z_det, t), t, t + s)
    z_step = ddim_step(ctx, z_up, ctx.eps(("secmi-up", t + s), z_up, t + s), t + s, t)
    return l2(z_det - z_step)[:, None]
