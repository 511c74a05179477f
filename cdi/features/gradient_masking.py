"""Gradient masking (GM): re-noise the entries the loss is most sensitive to, and measure."""

from __future__ import annotations

import math

import torch

from cdi.features.context import Batch, Call, FamilyRun, l2, shared_noise_key


def top_fraction_mask(g: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per sample, 1 on the ``ratio`` fraction of entries with the largest |g|, else 0."""
    flat = g.flatten(1).abs()
    k = max(1, math.ceil(ratio * flat.shape[1]))
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return mask.view_as(g)


def gradient_masking(b: Batch) -> FamilyRun:
    """GM ``[B, len(T)]`` (method §4, idx 4–13).

    The mask is a discontinuous function of the gradient, so the gradient passes are
    isolated (:attr:`Call.isolated`): computed from the image's own input alone, bit for
    bit, the mask, and with it the feature, is the same in every batch.
    """
    noise, z0, ts = b.noise.shared, b.z0, b.config.gm_timesteps
    grads = yield [Call(shared_noise_key(t), b.q(t, noise), t, target=noise, isolated=True) for t in ts]
    masks = [top_fraction_mask(r.grad, b.config.gm_mask_ratio) for r in grads if r.grad is not None]
    preds = yield [
        Call(("gm", t), (1.0 - m) * z0 + m * noise, t) for t, m in zip(ts, masks, strict=True)
    ]
    cols = [l2(m * ((noise - z0) - p.eps)) for m, p in zip(masks, preds, strict=True)]
    return torch.stack(cols, dim=1)
