"""PIA and PIAN: the model's own ε̂(z0, 0) as the noise, pushed to timestep t."""

from __future__ import annotations

import math

import torch

from cdi.features.context import Batch, Call, FamilyRun, z0_key


def _l5(x: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = x.flatten(1).norm(p=5, dim=1)
    return norms


def normalise_noise(eps0: torch.Tensor) -> torch.Tensor:
    """ε0 rescaled per sample to mean absolute value √(2/π), that of a standard normal."""
    n = eps0[0].numel()
    l1 = eps0.flatten(1).abs().sum(dim=1).clamp_min(torch.finfo(eps0.dtype).tiny)
    return eps0 * (n * math.sqrt(2.0 / math.pi) / l1).view(-1, *([1] * (eps0.dim() - 1)))


def _proximal(b: Batch, name: str, normalise: bool) -> FamilyRun:
    t = b.config.pia_t
    (res,) = yield [Call(z0_key(), b.z0, 0)]
    eps0 = normalise_noise(res.eps) if normalise else res.eps
    (res,) = yield [Call((name, t), b.q(t, eps0), t)]
    return _l5(eps0 - res.eps)[:, None]


def pia(b: Batch) -> FamilyRun:
    """PIA ``[B, 1]``: ‖ε0 − ε̂(√ᾱ_t·z0 + √(1−ᾱ_t)·ε0, t)‖₅ with ε0 = ε̂(z0, 0)."""
    return (yield from _proximal(b, "pia", normalise=False))


def pian(b: Batch) -> FamilyRun:
    """PIAN ``[B, 1]``: PIA with ε0 normalised by :func:`normalise_noise`."""
    return (yield from _proximal(b, "pian", normalise=True))
