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

#: Features that are lower for a training image than for an unseen one (method §4): every
#: loss-type feature: the denoising losses (DL, ML at each t, NO's final loss), SecMI's
#: reconstruction error, PIA's and PIAN's prediction inconsistency and gradient masking's
#: masked error. NO's ‖δ‖ has no direction fixed by the method and is left out.
MEMBER_LOWER: frozenset[str] = frozenset(name for name in FEATURE_NAMES if name != "no_delta_norm")

#: The candidate statistics of the directional protocol (:mod:`cdi.stats`), each a group of
#: loss-type features averaged (after a log and a standardisation) into one: the denoising
#: loss at one t (DL), PIA's deterministic prediction inconsistency, and the multi-t loss at
#: the low-noise end (ML at t < 400, where an image's memorised detail shows; one ε draw
#: serves all its timesteps, so the average removes per-timestep noise). They are the three
#: attack ideas that lead on every model measured (docs/method.md, "Choosing the
#: candidates"); the others (SecMI, PIAN, ML at high t, GM, NO) never led and each extra
#: candidate costs power through the multiplicity the permutation test charges.
MEMBER_CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dl", ("dl",)),
    ("pia", ("pia",)),
    ("ml_low_t", tuple(f"ml_t{t:03d}" for t in GM_ML_TIMESTEPS if t < 400)),
)

#: The name of the further candidate that is the mean of the others (``ProtocolOptions.combined``):
#: it gathers a signal spread thinly over several attacks, which no single one shows.
COMBINED_CANDIDATE = "combined"


def member_candidates(columns: list[int] | tuple[int, ...]) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The directional protocol's candidates among the layout columns ``columns``.

    Returns the candidates' names and, for each, the positions in ``columns`` of its
    features; a candidate none of whose features is in ``columns`` is left out. Where two or
    more are left, the names end with :data:`COMBINED_CANDIDATE`, the statistic
    :func:`cdi.stats.candidate_matrix` appends as their mean.
    """
    position = {FEATURE_NAMES[c]: i for i, c in enumerate(columns)}
    names, groups = [], []
    for name, members in MEMBER_CANDIDATES:
        group = tuple(position[m] for m in members if m in position)
        if group:
            names.append(name)
            groups.append(group)
    if len(groups) >= 2:
        names.append(COMBINED_CANDIDATE)
    return tuple(names), tuple(groups)


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

    ``VERDICT`` (the default) is what the audit's verdict reads and nothing else: the union
    of the declarations in :mod:`cdi.reads`, which depends on the protocol (the directional
    test reads six features; a scorer protocol every one of the 26). ``ALL`` is the
    "grey-box" set of all 26; ``GRADIENT_FREE`` needs only noise predictions (DL, SecMI, PIA,
    PIAN, ML), for models served without gradient access.
    """

    VERDICT = "verdict"
    ALL = "all"
    GRADIENT_FREE = "gradient-free"

    @property
    def families(self) -> tuple[str, ...]:
        """The families the set may compute (``VERDICT``: any of them, as its readers ask)."""
        if self is not FeatureSet.GRADIENT_FREE:
            return ("dl", "secmi", "pia", "pian", "gm", "ml", "no")
        return ("dl", "secmi", "pia", "pian", "ml")

    @property
    def columns(self) -> list[int]:
        """Indices into :data:`FEATURE_NAMES` of the features this set may compute.

        For ``VERDICT`` that is all 26; what an audit extracts of them is
        :func:`cdi.reads.columns_read` of its options.
        """
        out: list[int] = []
        for family in self.families:
            sl = FAMILY_COLUMNS[family]
            out.extend(range(sl.start, sl.stop))
        return sorted(out)
