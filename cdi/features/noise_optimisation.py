"""Noise optimisation (NO): how far, and how well, a few gradient steps lower the loss.

Departures from the reference (method §4): the final loss is evaluated on x_t + δ, the
input the optimiser saw (not a re-noised copy), and the objective and optimiser state are
per sample (plain gradient descent with a fixed step), so an image's features never depend
on the rest of its batch. The reference's batch-joint L-BFGS-B is not batch-invariant.
"""

from __future__ import annotations

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import BatchContext, l2
from cdi.features.loss import shared_noise_key


def noise_optimisation(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """NO ``[B, 2]``: [‖ε̂(x_t+δ, t) − ε‖₂ after the steps, ‖δ‖₂]."""
    t, noise = cfg.no_t, ctx.noise.shared
    x_t = ctx.q(t, noise)
    delta = torch.zeros_like(x_t)
    for step in range(cfg.no_steps):
        # At δ = 0 the input is ML's/GM's shared input at t: its gradient is reused.
        key = shared_noise_key(t) if step == 0 else None
        _, g = ctx.loss_grad(key, x_t + delta, t, noise)
        delta = delta - cfg.no_step_size * g
    final = l2(ctx.eps(("no-final", t), x_t + delta, t) - noise)
    return torch.stack([final, l2(delta)], dim=1)
