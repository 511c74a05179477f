"""Gradient masking (GM): re-noise the entries the loss is most sensitive to, and measure."""

from __future__ import annotations

import math

import torch

from cdi.features.config import FeatureConfig
from cdi.features.context import BatchContext, l2
from cdi.features.loss import shared_noise_key


def top_fraction_mask(g: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per sample, 1 on the ``ratio`` fraction of entries with the largest |g|, else 0."""
    flat = g.flatten(1).abs()
    k = max(1, math.ceil(ratio * flat.shape[1]))
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return mask.view_as(g)


def gradient_masking(ctx: BatchContext, cfg: FeatureConfig) -> torch.Tensor:
    """GM ``[B, len(T)]`` (method §4, idx 4–13)."""
    noise, z0 = ctx.noise.shared, ctx.z0
    cols = []
    for t in cfg.gm_timesteps:
        _, g = ctx.loss_grad(shared_noise_key(t), ctx.q(t, noise), t, noise)
        m = top_fraction_mask(g, cfg.gm_mask_ratio)
        x_masked = (1.0 - m) * z0 + m * noise
        pred = ctx.eps(("gm", t), x_masked, t)
        cols.append(l2(m * ((noise - z0) - pred)))
    return torch.stack(cols, dim=1)
