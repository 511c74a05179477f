"""Per-batch state shared by the feature families: z0, noise, conditioning, network calls.

Several features evaluate the same network call (method §4, "Shared work"): GM's gradient
pass at t is ML's loss at t, NO's first gradient is GM's at its timestep, PIA's ε̂(z0, 0)
is SecMI's first inversion step. Every call goes through :class:`BatchContext` under a
key naming its input; with sharing on, a key is evaluated once per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter


@dataclass
class PassCounter:
    """Network passes made, counted per image (a call on a batch of B adds B)."""

    forward: int = 0
    backward: int = 0

    def add(self, other: PassCounter) -> None:
        self.forward += other.forward
        self.backward += other.backward


def image_seed(seed: int, sha256: str) -> int:
    """The seed of an image's own generator, from the audit seed and the image's SHA-256."""
    digest = hashlib.sha256(f"cdi-noise/1:{int(seed)}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class NoiseDraws:
    """Every random draw of a batch, image by image from that image's own generator.

    ``shared`` ``[B, *z]`` is the one ε per image of GM, ML and NO; ``dl`` ``[R, B, *z]``
    are DL's fresh draws. The draw order per image is fixed, so an image's noise never
    depends on the feature set, its batch or its neighbours.
    """

    shared: torch.Tensor
    dl: torch.Tensor

    @classmethod
    def draw(cls, seed: int, sha256s: Sequence[str], shape: Sequence[int], dl_repeats: int,
             device: torch.device) -> NoiseDraws:
        shared, dl = [], []
        for sha in sha256s:
            g = torch.Generator(device="cpu").manual_seed(image_seed(seed, sha))
            shared.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
            dl.append(torch.randn((dl_repeats, *shape), generator=g, dtype=torch.float32))
        return cls(
            shared=torch.stack(shared).to(device),
            dl=torch.stack(dl, dim=1).to(device),
        )


def l2(x: torch.Tensor) -> torch.Tensor:
    """Plain L2 norm over all entries of each sample: ``[B, …] → [B]``."""
    return x.flatten(1).norm(p=2, dim=1)


class BatchContext:
    """One batch's inputs and its memoised network calls.

    ``z0`` ``[B, *z]`` float32; ``cond`` the adapter's batch conditioning or ``None``.
    """

    def __init__(self, adapter: DiffusionAdapter, z0: torch.Tensor, cond: torch.Tensor | None,
                 noise: NoiseDraws, counter: PassCounter, share: bool = True) -> None:
        self.adapter = adapter
        self.z0 = z0
        self.cond = cond
        self.noise = noise
        self.counter = counter
        self.share = share
        self._eps: dict[Hashable, torch.Tensor] = {}
        self._grad: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch(self) -> int:
        return int(self.z0.shape[0])

    def alpha_bar(self, t: int) -> float:
        return float(self.adapter.alphas_cumprod[t])

    def q(self, t: int, eps: torch.Tensor) -> torch.Tensor:
        """q(z0, t, ε) = √ᾱ_t·z0 + √(1−ᾱ_t)·ε."""
        a = self.alpha_bar(t)
        return a**0.5 * self.z0 + (1.0 - a) ** 0.5 * eps

    def eps(self, key: Hashable, z: torch.Tensor, t: int) -> torch.Tensor:
        """ε̂(z, t) without gradient; ``key`` names the input ``z`` for sharing."""
        if self.share and key in self._eps:
            return self._eps[key]
        with torch.inference_mode():
            out = self.adapter.eps(z, t, self.cond)
        out = out.clone()  # a normal tensor, usable later beside autograd
        self.counter.forward += self.batch
        if self.share:
            self._eps[key] = out
        return out

    def loss_grad(self, key: Hashable | None, x: torch.Tensor, t: int,
                  target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ε̂(x, t) and ∂‖ε̂(x, t) − target‖₂/∂x per sample, gradients w.r.t. the input only.

        The loss is summed over the batch; since each sample's norm depends only on its own
        input, each sample's gradient is its own. ``key=None`` never shares.
        """
        if self.share and key is not None and key in self._grad:
            return self._grad[key]
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            out = self.adapter.eps(xg, t, self.cond)
            loss = l2(out - target).sum()
            (grad,) = torch.autograd.grad(loss, xg)
        out = out.detach()
        self.counter.forward += self.batch
        self.counter.backward += self.batch
        if self.share and key is not None:
            self._grad[key] = (out, grad)
            self._eps.setdefault(key, out)
        return out, grad
