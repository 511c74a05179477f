"""One noise parameterisation for every family (method §10.1).

Every family writes its noisy input as z_t = a_t·z0 + s_t·ε and is read as a noise
predictor ε̂(z_t, t). The feature families use only (a_t, s_t) and ε̂, so one formula serves
DDPM-style models (ε-, v- or x0-prediction) and rectified-flow models alike.

``t`` is always an index into the feature grid 0 … T−1 (T = the scheduler's
``num_train_timesteps``); what the network itself receives as its timestep is
:attr:`NoiseSchedule.model_timesteps` ``[t]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Parameterisation = Literal["epsilon", "v_prediction", "sample", "flow"]
PARAMETERISATIONS: tuple[Parameterisation, ...] = get_args(Parameterisation)
#: What a DDPM scheduler's ``prediction_type`` may name (flow models have a schedule of their own).
DDPM_PREDICTIONS: tuple[Parameterisation, ...] = tuple(p for p in PARAMETERISATIONS if p != "flow")


@dataclass(frozen=True)
class NoiseSchedule:
    """(a_t, s_t) for every t of the grid, float64 on the CPU, and the network's timesteps.

    ``kind`` is ``"ddpm"`` (a_t = √ᾱ_t, s_t = √(1−ᾱ_t)) or ``"flow"`` (a_t = 1 − σ_t,
    s_t = σ_t). ``prediction`` says what the network outputs, and :meth:`to_eps` turns it
    into ε̂.
    """

    kind: Literal["ddpm", "flow"]
    prediction: Parameterisation
    a: torch.Tensor
    s: torch.Tensor
    #: What the network receives for grid index t (t itself for DDPM, σ_t·T for SD3, …).
    model_timesteps: torch.Tensor

    def __post_init__(self) -> None:
        if self.prediction not in PARAMETERISATIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        if not (self.a.shape == self.s.shape == self.model_timesteps.shape) or self.a.dim() != 1:
            raise ValueError("a, s and model_timesteps must be 1-D and of equal length")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.a.shape[0])

    @classmethod
    def ddpm(cls, alphas_cumprod: torch.Tensor, prediction: Parameterisation = "epsilon") -> NoiseSchedule:
        """The variance-preserving schedule of ᾱ_t (DDPM, LDM, DiT, Stable Diffusion, SDXL)."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        # Per entry in Python floats: the same numbers as √ᾱ and √(1−ᾱ) written by hand.
        a = torch.tensor([float(x) ** 0.5 for x in ab], dtype=torch.float64)
        s = torch.tensor([(1.0 - float(x)) ** 0.5 for x in ab], dtype=torch.float64)
        steps = torch.arange(ab.shape[0], dtype=torch.float64)
        return cls("ddpm", prediction, a, s, steps)

    @classmethod
    def flow(cls, sigmas: torch.Tensor, timestep_scale: float) -> NoiseSchedule:
        """Rectified flow: z_t = (1 − σ_t)·z0 + σ_t·ε; the network predicts v = ε − z0.

        ``sigmas`` ``[T]`` are the σ used for each grid index (already shifted as the
        model's pipeline shifts them); the network receives σ_t·``timestep_scale``.
        """
        sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if bool(((sig < 0) | (sig >= 1)).any()):
            raise ValueError("flow σ must lie in [0, 1)")
        return cls("flow", "flow", 1.0 - sig, sig.clone(), sig * float(timestep_scale))

    def coefficients(self, t: int) -> tuple[float, float]:
        """(a_t, s_t) as Python floats."""
        return float(self.a[t]), float(self.s[t])

    def to_eps(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ from the network output ``out`` at ``z_t``; ``t`` ``[B]`` grid indices. float32."""
        out = out.float()
        if self.prediction == "epsilon":
            return out
        idx = t.detach().to("cpu", torch.long)
        shape = (-1, *([1] * (z_t.dim() - 1)))
        a = self.a[idx].to(z_t.device, torch.float32).view(shape)
        s = self.s[idx].to(z_t.device, torch.float32).view(shape)
        z = z_t.float()
        if self.prediction == "v_prediction":
            # v = a·ε − s·z0 and z = a·z0 + s·ε give ε = a·v + s·z (a² + s² = 1).
            return a * out + s * z
        if self.prediction == "flow":
            # v = ε − z0 and z = (1 − σ)·z0 + σ·ε give ε = z + (1 − σ)·v.
            return z + a * out
        return (z - a * out) / s  # x0-prediction

    def describe(self, timesteps: tuple[int, ...] = ()) -> dict[str, object]:
        """What a report records: the parameterisation and, for flow models, the σ of each
        grid index in ``timesteps`` (those the features used)."""
        out: dict[str, object] = {"noise_schedule": self.kind, "prediction_type": self.prediction}
        if self.kind == "flow":
            out["sigmas"] = {str(t): float(self.s[t]) for t in sorted(set(timesteps))}
        return out


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The static timestep shift of SD3's flow-matching scheduler: s·σ/(1 + (s − 1)·σ)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def exponential_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """The resolution-dependent shift of Flux's scheduler: e^μ/(e^μ + (1/σ − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def linear_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """The scheduler's ``time_shift_type="linear"`` variant: μ/(μ + (1/σ − 1))."""
    return mu / (mu + (1.0 / sigma - 1.0))


def resolution_shift_mu(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                        max_shift: float) -> float:
    """μ for a latent sequence of ``image_seq_len`` tokens: the line through
    (``base_seq_len``, ``base_shift``) and (``max_seq_len``, ``max_shift``), as the Flux and
    SD3 pipelines compute it for dynamic shifting."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flow_grid_sigmas(num_train_timesteps: int, shift: float = 1.0, mu: float | None = None,
                     shift_type: Literal["exponential", "linear"] = "exponential") -> torch.Tensor:
    """σ for each grid index t: t/T, shifted as the pipeline shifts it, clamped to the
    scheduler's range (its smallest σ is that of t = 1, so t = 0 never gives σ = 0).

    With ``mu`` the resolution-dependent shift (``shift_type``) is used, else the static
    ``shift``.
    """
    T = num_train_timesteps
    raw = torch.arange(T, dtype=torch.float64).clamp_min(1.0) / T
    if mu is None:
        return shift_sigma(raw, shift)
    return exponential_shift(raw, mu) if shift_type == "exponential" else linear_shift(raw, mu)
