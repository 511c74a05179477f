"""Loss-type features: the denoising loss (DL) and the multiple loss (ML) over timesteps."""

from __future__ import annotations

import torch

from cdi.features.context import Batch, Call, FamilyRun, l2, shared_noise_key


def denoising_loss(b: Batch) -> FamilyRun:
    """DL ``[B, 1]``: mean over r of ‖ε̂(q(z0,t,ε_r),t) − ε_r‖₂ with fresh ε_r."""
    t, repeats = b.config.dl_t, b.config.dl_repeats
    noises = [b.noise.dl[r] for r in range(repeats)]
    results = yield [Call(("dl", r), b.q(t, n), t) for r, n in enumerate(noises)]
    losses = [l2(res.eps - n) for res, n in zip(results, noises, strict=True)]
    return torch.stack(losses, dim=1).mean(dim=1, keepdim=True)


def multiple_loss(b: Batch) -> FamilyRun:
    """ML ``[B, len(T)]``: ‖ε̂(q(z0,t,ε),t) − ε‖₂ for each t of ``b.ml_timesteps``, with the shared ε."""
    noise, ts = b.noise.shared, b.ml_timesteps
    results = yield [Call(shared_noise_key(t), b.q(t, noise), t) for t in ts]
    return torch.stack([l2(r.eps - noise) for r in results], dim=1)
