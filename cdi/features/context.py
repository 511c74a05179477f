"""What the feature families share: the batch's inputs, noise, and the network calls.

Each family is written as a generator that *yields* the network calls it needs next (a list
of :class:`Call`) and receives their results. The extractor's scheduler
(:mod:`cdi.features.scheduler`) runs all families of a batch side by side, so that

- a call several families need (GM's gradient pass at t is ML's loss at t and NO's first
  gradient; PIA's ε̂(z0, 0) is SecMI's first inversion step) is evaluated once: calls are
  named by a key that identifies their input (method §4, "Shared work");
- independent calls of the same round are concatenated into one larger network call with a
  timestep per sample, which uses the hardware better than many small calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass

import torch

from cdi.features.config import FeatureConfig
from cdi.models.base import DiffusionAdapter


@dataclass
class PassCounter:
    """Network passes made, counted per image (a call on a batch of B adds B)."""

    forward: int = 0
    backward: int = 0


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
    norms: torch.Tensor = x.flatten(1).norm(p=2, dim=1)
    return norms


@dataclass(frozen=True)
class Call:
    """One network call on the whole batch: ε̂(z, t), optionally with an input gradient.

    ``key`` names the input (same key, same input): calls with equal keys are evaluated
    once. With ``target`` set, the result also carries ∂‖ε̂(z, t) − target‖₂/∂z per sample.
    ``key=None`` marks a call nobody else can share (an optimiser's intermediate state).

    ``isolated`` asks for each sample to be evaluated in a network call of its own. A
    network's rounding depends on the shape and content of the call it runs in, so a
    sample's result in a fused call differs in its last bits with its neighbours; that is
    harmless for continuous features but not for a discontinuous function of the result
    (GM's top-fraction mask, where a near-tie at the boundary flips an entry). An isolated
    result depends on the sample's own input alone, bit for bit.

    ``rows`` names the batch images the call's samples belong to, in order, when the call
    is on some of them only (their conditioning is then those rows'); ``None``: the batch.
    """

    key: Hashable | None
    z: torch.Tensor
    t: int
    target: torch.Tensor | None = None
    isolated: bool = False
    rows: tuple[int, ...] | None = None

    @property
    def needs_grad(self) -> bool:
        return self.target is not None


@dataclass(frozen=True)
class CallResult:
    eps: torch.Tensor
    grad: torch.Tensor | None = None
    #: Evaluated sample by sample (see :attr:`Call.isolated`).
    isolated: bool = False

    def serves(self, call: Call) -> bool:
        """Whether this result answers ``call`` (a gradient, isolation where it asks for them)."""
        return (self.grad is not None or not call.needs_grad) and (self.isolated or not call.isolated)


#: Bound on |g_fused − g_alone| / max|g_alone| for float32 passes: 2·10⁻⁵ is the largest
#: measured on the shipped models (CPU, fused calls of 32 against single-sample calls), and
#: the bound leaves a factor 10 (see ``docs/performance.md``).
FP32_ROUNDING = 2e-4
#: The same for reduced-precision (bfloat16 / float16 autocast) or TF32 passes.
REDUCED_ROUNDING = 3e-2


#: A family: yields lists of calls, receives their results in order, returns ``[B, k]``.
FamilyRun = Generator[list[Call], list[CallResult], torch.Tensor]


class Batch:
    """One batch's inputs: ``z0`` ``[B, *z]`` float32, the noise, and the adapter's schedule.

    The families see the model only through (a_t, s_t) and ε̂ (method §10.1), so each is
    written once for every parameterisation.
    """

    def __init__(self, adapter: DiffusionAdapter, z0: torch.Tensor, noise: NoiseDraws,
                 config: FeatureConfig, *, rounding: float = FP32_ROUNDING, isolate_gm: bool = False,
                 timesteps: dict[str, tuple[int, ...]] | None = None) -> None:
        self.adapter = adapter
        self.z0 = z0
        self.noise = noise
        self.config = config
        self.schedule = adapter.schedule
        #: The timesteps GM and ML compute (default: all of the layout's), in layout order.
        self.gm_timesteps = (timesteps or {}).get("gm", tuple(config.gm_timesteps))
        self.ml_timesteps = (timesteps or {}).get("ml", tuple(config.gm_timesteps))
        #: How far (relative to a sample's largest entry) a gradient of a fused network call
        #: may stray from the same sample's gradient computed alone, with room to spare.
        self.rounding = rounding
        #: Whether GM isolates every gradient pass at once instead of fusing them and
        #: recomputing its near-ties (the cheaper choice where most masks are near-ties).
        self.isolate_gm = isolate_gm
        #: GM's masks recomputed alone, and all its masks, in this batch.
        self.gm_recomputed = 0
        self.gm_masks = 0

    @property
    def size(self) -> int:
        return int(self.z0.shape[0])

    def coefficients(self, t: int) -> tuple[float, float]:
        """(a_t, s_t): z_t = a_t·z0 + s_t·ε."""
        return self.schedule.coefficients(t)

    def q(self, t: int, eps: torch.Tensor) -> torch.Tensor:
        """q(z0, t, ε) = a_t·z0 + s_t·ε (√ᾱ_t and √(1−ᾱ_t) for DDPM-style models)."""
        a, s = self.coefficients(t)
        return a * self.z0 + s * eps


def shared_noise_key(t: int) -> tuple[str, int]:
    """Key of the call ε̂(q(z0, t, ε_shared), t), common to ML, GM and NO."""
    return ("shared", t)


def z0_key() -> tuple[str, int]:
    """Key of the call ε̂(z0, 0), common to PIA, PIAN and SecMI's first inversion step."""
    return ("z0", 0)
