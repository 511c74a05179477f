"""SecMI's statistic: the error of one DDIM step forth and back after deterministic inversion."""

from __future__ import annotations

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import Batch, Call, FamilyRun, l2, z0_key


def ddim_step(b: Batch, z: torch.Tensor, eps: torch.Tensor, s: int, s_next: int) -> torch.Tensor:
    """One deterministic DDIM step from timestep s to s′ given e = ε̂(z, s) (either direction)."""
    a, a_next = b.alpha_bar(s), b.alpha_bar(s_next)
    x0 = (z - (1.0 - a) ** 0.5 * eps) / a**0.5
    return a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps


def secmi_depth(config: FeatureConfig) -> int:
    """The call lists :func:`secmi_stat` yields: one per inversion step, then up and back."""
    return config.secmi_t // config.secmi_step + 2


def secmi_stat(b: Batch) -> FamilyRun:
    """SecMI_stat ``[B, 1]``: ‖z_det − z_step‖₂ (method §4, idx 1)."""
    t, s = b.config.secmi_t, b.config.secmi_step
    z = b.z0
    for k in range(0, t, s):
        (res,) = yield [Call(z0_key() if k == 0 else ("secmi", k), z, k)]
        z = ddim_step(b, z, res.eps, k, k + s)
    z_det = z
    (res,) = yield [Call(("secmi", t), z_det, t)]
    z_up = ddim_step(b, z_det, res.eps, t, t + s)
    (res,) = yield [Call(("secmi-up", t + s), z_up, t + s)]
    z_step = ddim_step(b, z_up, res.eps, t + s, t)
    return l2(z_det - z_step)[:, None]
