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


def near_tie(g: torch.Tensor, ratio: float, rounding: float) -> torch.Tensor:
    """Per sample ``[B]`` bool: whether rounding could move :func:`top_fraction_mask`.

    True where the gap between the last entry in the mask and the first one out is at most
    ``rounding`` times the sample's largest |g| (with ``rounding`` bounding, relative to that
    largest entry, how far another network call's rounding moves any entry). Elsewhere no
    entry can cross the boundary and the mask is that of every rounding within the bound.
    """
    flat = g.flatten(1).abs().double()
    n = flat.shape[1]
    k = max(1, math.ceil(ratio * n))
    if k >= n:
        return torch.zeros(flat.shape[0], dtype=torch.bool, device=g.device)
    top = flat.topk(k + 1, dim=1).values
    return (top[:, k - 1] - top[:, k]) <= rounding * top[:, 0]


def gradient_masking(b: Batch) -> FamilyRun:
    """GM ``[B, len(T)]`` at the timesteps ``b.gm_timesteps`` (method §4, idx 4–13).

    The mask is a discontinuous function of the gradient, so it is always the mask of the
    gradient computed from the image's own input alone: the gradient passes run fused
    (shared with ML and NO's first step), and only the samples whose mask a rounding
    difference could move (:func:`near_tie`) are computed again in isolated calls
    (:attr:`Call.isolated`), whose result is the image's own, bit for bit. The mask, and
    with it the feature, is then the same in every batch. Where most masks are near-ties
    (large inputs, reduced precision), ``b.isolate_gm`` isolates every gradient pass at once.
    """
    noise, z0, ts, ratio = b.noise.shared, b.z0, b.gm_timesteps, b.config.gm_mask_ratio
    inputs = [b.q(t, noise) for t in ts]
    fused = yield [Call(shared_noise_key(t), x, t, target=noise, isolated=b.isolate_gm)
                   for t, x in zip(ts, inputs, strict=True)]
    grads = [r.grad for r in fused if r.grad is not None]
    redo = []
    for j, (t, x, g) in enumerate(zip(ts, inputs, grads, strict=True)):
        if fused[j].isolated:
            continue
        rows = tuple(int(i) for i in near_tie(g, ratio, b.rounding).nonzero().flatten().tolist())
        b.gm_masks += b.size
        b.gm_recomputed += len(rows)
        if rows:
            idx = torch.tensor(rows, device=x.device)
            redo.append((j, idx, Call(None, x[idx], t, target=noise[idx], isolated=True, rows=rows)))
    if redo:
        alone = yield [call for _, _, call in redo]
        grads = [g.clone() for g in grads]
        for (j, idx, _), res in zip(redo, alone, strict=True):
            assert res.grad is not None
            grads[j][idx] = res.grad
    masks = [top_fraction_mask(g, ratio) for g in grads]
    preds = yield [
        Call(("gm", t), (1.0 - m) * z0 + m * noise, t) for t, m in zip(ts, masks, strict=True)
    ]
    cols = [l2(m * ((noise - z0) - p.eps)) for m, p in zip(masks, preds, strict=True)]
    return torch.stack(cols, dim=1)
