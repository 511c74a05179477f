"""SecMI's statistic: the error of one DDIM step forth and back after deterministic inversion."""

from __future__ import annotations

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import Batch, Call, FamilyRun, l2, z0_key


def ddim_step(b: Batch, z: torch.Tensor, eps: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
    """One deterministic step from t to t′ given e = ε̂(z, t), in either direction.

    x̂0 = (z − s_t·e)/a_t, z′ = a_t′·x̂0 + s_t′·e: the DDIM step for DDPM-style models, the
    Euler step of the probability-flow ODE for rectified flow (method §10.1).
    """
    (a, s), (a_next, s_next) = b.coefficients(t), b.coefficients(t_next)
    x0 = (z - s * eps) / a
    return a_next * x0 + s_next * eps


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
