"""The versioned layout of the 26 CDI features (method §4).

The column order and names are part of the on-disk contract: feature caches, CSV files and
reports name ``LAYOUT_VERSION`` so that a change of order or meaning can never be confused
with an old file. Change either, and bump the version.
"""

from __future__ import annotations

from enum import Enum

LAYOUT_VERSION = "cdi-features/1"

#: Timesteps of the gradient-masking and multiple-loss families; fixed by the layout.
GM_ML_TIMESTEPS: tuple[int, ...] = tuple(range(0, 1000, 100))

FEATURE_NAMES: tuple[str, ...] = (
    "dl",
    "secmi_stat",
    "pia",
    "pian",
    *(f"gm_t{t:03d}" for t in GM_ML_TIMESTEPS),
    *(f"ml_t{t:03d}" for t in GM_ML_TIMESTEPS),
    "no_loss",
    "no_delta_norm",
)
assert len(FEATURE_NAMES) == 26

#: Column slices of each feature family.
FAMILY_COLUMNS: dict[str, slice] = {
    "dl": slice(0, 1),
    "secmi": slice(1, 2),
    "pia": slice(2, 3),
    "pian": slice(3, 4),
    "gm": slice(4, 14),
    "ml": slice(14, 24),
    "no": slice(24, 26),
}


class FeatureSet(str, Enum):
    """Which features are computed.

    ``ALL`` is the "grey-box" set of all 26; ``GRADIENT_FREE`` needs only noise predictions
    (DL, SecMI, PIA, PIAN, ML), for models served without gradient access.
    """

    ALL = "all"
    GRADIENT_FREE = "gradient-free"

    @property
    def families(self) -> tuple[str, ...]:
        if self is FeatureSet.ALL:
            return ("dl", "secmi", "pia", "pian", "gm", "ml", "no")
        return ("dl", "secmi", "pia", "pian", "ml")

    @property
    def columns(self) -> list[int]:
        """Indices into :data:`FEATURE_NAMES` of the features this set computes."""
        out: list[int] = []
        for family in self.families:
            sl = FAMILY_COLUMNS[family]
            out.extend(range(sl.start, sl.stop))
        return sorted(out)
