"""Noise optimisation (NO): how far, and how well, a few gradient steps lower the loss.

Departures from the reference (method §4): the final loss is evaluated on x_t + δ, the
input the optimiser saw (not a re-noised copy), and the objective and optimiser state are
per sample (plain gradient descent with a fixed step), so an image's features never depend
on the rest of its batch. The reference's batch-joint L-BFGS-B is not batch-invariant.
"""

from __future__ import annotations

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import Batch, Call, FamilyRun, l2, shared_noise_key


def noise_optimisation_depth(config: FeatureConfig) -> int:
    """The call lists :func:`noise_optimisation` yields: one per step, then the final loss."""
    return config.no_steps + 1


def noise_optimisation(b: Batch) -> FamilyRun:
    """NO ``[B, 2]``: [‖ε̂(x_t+δ, t) − ε‖₂ after the steps, ‖δ‖₂]."""
    cfg, noise = b.config, b.noise.shared
    t = cfg.no_t
    x_t = b.q(t, noise)
    delta = torch.zeros_like(x_t)
    for step in range(cfg.no_steps):
        # At δ = 0 the input is the shared one of ML and GM at t: that call is reused.
        key = shared_noise_key(t) if step == 0 else None
        (res,) = yield [Call(key, x_t + delta, t, target=noise)]
        assert res.grad is not None
        delta = delta - cfg.no_step_size * res.grad
    (res,) = yield [Call(None, x_t + delta, t)]
    return torch.stack([l2(res.eps - noise), l2(delta)], dim=1)
