"""What the rectified-flow families (SD3, Flux) share: the flow-matching schedule as their
pipelines shift it (method §10.1), the autoencoder with its shift factor, and timesteps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cdi.errors import MalformedModelError, UnsupportedModelError
from cdi.models.detect import ModelInfo
from cdi.models.diffusers_base import DiffusersAdapter
from cdi.models.loading import load_component
from cdi.models.schedule import NoiseSchedule, flow_grid_sigmas, resolution_shift_mu

#: Scheduler options that change σ in ways that depend on the number of sampling steps;
#: the audit's grid has no such number, so a model that sets them is refused.
_STEP_DEPENDENT = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                   "invert_sigmas", "stochastic_sampling")


class FlowAdapter(DiffusersAdapter):
    """Base of the rectified-flow adapters: z_t = (1 − σ_t)·z0 + σ_t·ε, the network predicts
    v = ε − z0 (``NoiseSchedule(kind="flow")``)."""

    lora_prefix = "transformer"
    #: Whether the network receives the scheduler's timestep σ·T (SD3) or that divided by
    #: 1000 (Flux's pipeline does so before the call: σ itself for T = 1000).
    timestep_in_steps: bool = True
    #: ``max_shift`` the family's pipeline uses when the scheduler config names none (each
    #: family declares its own: Flux 1.15, SD3 1.16).
    default_max_shift: float

    #: σ-shift facts for the report: ``{"shift": s}`` or ``{"mu": μ, "image_seq_len": n}``.
    shift_facts: dict[str, object]

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        self.autoencoder = load_component(info, "autoencoder", dtype).to(self.device)
        self.transformer = load_component(info, "transformer", dtype).to(self.device)
        self.scaling_factor = float(self.autoencoder.config.get("scaling_factor") or 1.0)
        self.shift_factor = float(self.autoencoder.config.get("shift_factor") or 0.0)
        # SD3 and Flux both read captions with a CLIP encoder and a second encoder (CLIP, T5).
        self.text_encoder = load_component(info, "text_encoder", dtype).to(self.device)
        self.text_encoder_2 = load_component(info, "text_encoder_2", dtype).to(self.device)
        self.tokenizer = load_component(info, "tokenizer")
        self.tokenizer_2 = load_component(info, "tokenizer_2")

    @staticmethod
    def vae_factor(info: ModelInfo) -> int:
        """How many pixels one latent spans, per side."""
        return int(2 ** (len(info.configs["autoencoder"].get("block_out_channels") or [0]) - 1))

    @classmethod
    def image_seq_len(cls, info: ModelInfo) -> int:
        """Tokens the transformer sees for one image: latents in 2×2 patches."""
        latent = info.image_size // cls.vae_factor(info)
        return int((latent // 2) ** 2)

    def _schedule(self, info: ModelInfo) -> NoiseSchedule:
        cfg = info.configs["scheduler"]
        where = f"{info.reference.source}/{info.components['scheduler']}/scheduler_config.json"
        set_options = [k for k in _STEP_DEPENDENT if cfg.get(k)]
        if set_options:
            raise UnsupportedModelError(f"{where}: {', '.join(set_options)} is not supported (σ would depend "
                                        "on the number of sampling steps)")
        T = cfg.get("num_train_timesteps", 1000)
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise MalformedModelError(f"{where}: num_train_timesteps must be an integer ≥ 2")
        if cfg.get("use_dynamic_shifting"):
            seq = self.image_seq_len(info)
            mu = resolution_shift_mu(seq, int(cfg.get("base_image_seq_len", 256)),
                                     int(cfg.get("max_image_seq_len", 4096)),
                                     float(cfg.get("base_shift", 0.5)),
                                     float(cfg.get("max_shift", self.default_max_shift)))
            shift_type = cfg.get("time_shift_type", "exponential")
            if shift_type not in ("exponential", "linear"):
                raise MalformedModelError(f"{where}: unknown time_shift_type {shift_type!r}")
            sigmas = flow_grid_sigmas(T, mu=mu, shift_type=shift_type)
            self.shift_facts = {"mu": mu, "image_seq_len": seq, "time_shift_type": shift_type}
        else:
            shift = cfg.get("shift", 1.0)
            if isinstance(shift, bool) or not isinstance(shift, int | float) or shift <= 0:
                raise MalformedModelError(f"{where}: shift must be a positive number")
            sigmas = flow_grid_sigmas(T, shift=float(shift))
            self.shift_facts = {"shift": float(shift)}
        return NoiseSchedule.flow(sigmas, float(T) if self.timestep_in_steps else T / 1000.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.autoencoder.encode(x.to(self.device, self.dtype)).latent_dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def describe(self, timesteps: Sequence[int] = ()) -> dict[str, object]:
        return {**super().describe(timesteps), "flow_shift": dict(self.shift_facts)}
