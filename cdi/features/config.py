"""Parameters of the 26 features, with the reference implementation's defaults (method §4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cdi.errors import InputError
from cdi.features.layout import GM_ML_TIMESTEPS


@dataclass(frozen=True)
class FeatureConfig:
    """Every parameter that changes a feature's value.

    Timesteps are indices into the model's own noise schedule (0 … T−1).
    """

    #: Denoising loss: timestep and number of fresh noise draws averaged. Nine, not the
    #: reference's five: within the default audit's budget of 15 passes per image, four more
    #: DL draws buy more power than anything else measured (docs/method.md, "Choosing the draws").
    dl_t: int = 100
    dl_repeats: int = 9
    #: SecMI: inversion target timestep and DDIM step size.
    secmi_t: int = 100
    secmi_step: int = 10
    #: PIA / PIAN: the timestep the model's own ε̂(z0, 0) is pushed to.
    pia_t: int = 200
    #: Gradient masking and multiple loss: timesteps (fixed by the layout) and mask ratio.
    gm_timesteps: tuple[int, ...] = field(default=GM_ML_TIMESTEPS)
    gm_mask_ratio: float = 0.2
    #: Noise optimisation: timestep, number of gradient steps and step size.
    no_t: int = 100
    no_steps: int = 5
    no_step_size: float = 0.1

    def __post_init__(self) -> None:
        if tuple(self.gm_timesteps) != GM_ML_TIMESTEPS:
            raise InputError(
                f"gm_timesteps must be {GM_ML_TIMESTEPS}: the feature layout fixes them"
            )
        for name in ("dl_repeats", "secmi_step", "no_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1")
        if not 0.0 < self.gm_mask_ratio <= 1.0:
            raise InputError("gm_mask_ratio must lie in (0, 1]")
        if self.no_step_size <= 0:
            raise InputError("no_step_size must be positive")

    def validate_for(self, num_train_timesteps: int) -> None:
        """Raise :class:`InputError` if a timestep lies outside a schedule of that length."""
        used = {
            "dl_t": self.dl_t,
            "secmi_t + secmi_step": self.secmi_t + self.secmi_step,
            "pia_t": self.pia_t,
            "no_t": self.no_t,
            "max(gm_timesteps)": max(self.gm_timesteps),
        }
        for name, value in used.items():
            if not 0 <= value < num_train_timesteps:
                raise InputError(
                    f"{name} = {value} lies outside the model's schedule of {num_train_timesteps} steps"
                )
        if self.secmi_t % self.secmi_step:
            raise InputError("secmi_t must be a multiple of secmi_step")

    def timesteps(self) -> tuple[int, ...]:
        """Every grid index at which a feature evaluates the network, sorted."""
        used = {self.dl_t, self.pia_t, self.no_t, 0, *self.gm_timesteps}
        used.update(range(0, self.secmi_t + self.secmi_step + 1, self.secmi_step))
        return tuple(sorted(used))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gm_timesteps"] = list(self.gm_timesteps)
        return d
