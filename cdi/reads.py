"""Which features the verdict reads: one declaration per protocol and control, and their union.

An audit extracts only the features some part of its verdict reads (its protocol's test,
that protocol's negative control, the direction check, ...), unless it is asked for a whole
feature set (``features="all"`` or ``"gradient-free"``). Each part declares what it reads
here, once, as a :class:`Reads`; :func:`features_read` returns the union for an audit's
options, in layout order, and the extractor computes that and nothing else.

**Adding a part of the verdict that reads features** (a calibration, a further control)
takes one edit: a new :class:`Reads` entry in :data:`VERDICT_READS`. The extraction, the
feature-cache rows, the report's recorded feature set and the pass counts all follow from it.

Pure Python (no numpy, no torch): the command line and the planner read it without loading
the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cdi.features.layout import (
    FAMILY_COLUMNS,
    FEATURE_NAMES,
    GM_ML_TIMESTEPS,
    MEMBER_CANDIDATES,
    FeatureSet,
)

__all__ = [
    "CALIBRATION",
    "CALIBRATION_READS",
    "CROSSFIT_TEST",
    "DIRECTIONAL_TEST",
    "DIRECTION_CHECK",
    "DIRECTION_FEATURES",
    "EVERY_FEATURE",
    "NEGATIVE_CONTROL",
    "REFERENCE_TEST",
    "SAME_AS_TEST",
    "VERDICT_READS",
    "Reads",
    "columns_read",
    "family_columns",
    "features_read",
    "tested_columns",
    "timesteps_of",
]

#: What a part reads when it reads every feature of the audit's feature set (a fitted
#: scorer): all 26 under ``verdict`` and ``all``, the gradient-free ones under ``gradient-free``.
EVERY_FEATURE = "every feature of the feature set"
#: What the negative control reads: exactly what its protocol's test reads (it runs that
#: protocol on U's two halves).
SAME_AS_TEST = "what the audit's test reads"


@dataclass(frozen=True)
class Reads:
    """What one part of the verdict reads.

    ``reader`` names the part (as the report and the docs name it); ``features`` are feature
    names (:data:`~cdi.features.layout.FEATURE_NAMES`), or :data:`EVERY_FEATURE`, or
    :data:`SAME_AS_TEST`; ``protocols`` are the protocols under which the part runs
    (``None``: every protocol). ``test`` marks the declaration of a protocol's test itself.
    """

    reader: str
    features: tuple[str, ...] | str
    protocols: tuple[str, ...] | None = None
    test: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.features, str):
            if self.features not in (EVERY_FEATURE, SAME_AS_TEST):
                raise ValueError(f"{self.reader}: features must be names, {EVERY_FEATURE!r} or {SAME_AS_TEST!r}")
        else:
            unknown = [n for n in self.features if n not in FEATURE_NAMES]
            if unknown:
                raise ValueError(f"{self.reader} reads unknown features: {', '.join(unknown)}")

    def applies(self, protocol: str) -> bool:
        return self.protocols is None or protocol in self.protocols


#: The directional protocol (:func:`cdi.stats.directional_test`): its candidates, each a
#: group of loss-type features (:data:`~cdi.features.layout.MEMBER_CANDIDATES`: DL, PIA and
#: ML at t < 400); the combined candidate is their mean and reads nothing more.
DIRECTIONAL_TEST = Reads(
    "directional test", tuple(name for _, group in MEMBER_CANDIDATES for name in group),
    protocols=("directional",), test=True,
)
#: The reference protocol (:func:`cdi.stats.reference_test`) fits a scorer on every feature.
REFERENCE_TEST = Reads("reference test", EVERY_FEATURE, protocols=("reference",), test=True)
#: The cross-fitted protocol (:func:`cdi.stats.crossfit_test`) fits its scorers on every feature.
CROSSFIT_TEST = Reads("crossfit test", EVERY_FEATURE, protocols=("crossfit",), test=True)
#: The negative control (:func:`cdi.controls.negative_control`): the protocol on U's halves.
NEGATIVE_CONTROL = Reads("negative control", SAME_AS_TEST)

#: Loss-type features of the direction check's index (:func:`cdi.audit.direction_check`):
#: computed in every feature set, lower for training images (method §4).
DIRECTION_FEATURES: tuple[str, ...] = ("dl", "ml_t000", "ml_t100", "ml_t200")
#: The direction check (:func:`cdi.audit.direction_check`).
DIRECTION_CHECK = Reads("direction check", DIRECTION_FEATURES)

#: The difficulty-calibrated test and the shift control (:mod:`cdi.calibration`): they model
#: the directional test's own candidate features by the images' descriptors, so they cost no
#: forward pass of their own.
CALIBRATION_READS: tuple[str, ...] = tuple(dict.fromkeys(name for _, group in MEMBER_CANDIDATES for name in group))
CALIBRATION = Reads("calibrated test and shift control", CALIBRATION_READS)

#: Every part of the verdict that reads features. The union of what they read (for the
#: audit's protocol) is what a ``verdict`` audit extracts: a new part is one entry here.
VERDICT_READS: tuple[Reads, ...] = (
    DIRECTIONAL_TEST,
    REFERENCE_TEST,
    CROSSFIT_TEST,
    NEGATIVE_CONTROL,
    DIRECTION_CHECK,
    CALIBRATION,
)


class _Options(Protocol):
    """What :func:`features_read` needs of the options (``cdi.audit.AuditOptions`` has it)."""

    @property
    def protocol(self) -> str: ...

    @property
    def features(self) -> FeatureSet | str: ...


def _every(feature_set: FeatureSet) -> list[int]:
    """The columns a scorer may read under ``feature_set``: all 26, or the gradient-free ones."""
    return FeatureSet.ALL.columns if feature_set is FeatureSet.VERDICT else feature_set.columns


def _named(features: tuple[str, ...] | str, feature_set: FeatureSet, test: list[int]) -> list[int]:
    if features == EVERY_FEATURE:
        return _every(feature_set)
    if features == SAME_AS_TEST:
        return test
    return [FEATURE_NAMES.index(n) for n in features]


def _test_reads(protocol: str, feature_set: FeatureSet, reads: tuple[Reads, ...]) -> list[int]:
    tests = [r for r in reads if r.test and r.applies(protocol)]
    if len(tests) != 1:
        raise ValueError(f"protocol {protocol!r} has {len(tests)} test declarations, not one")
    return _named(tests[0].features, feature_set, [])


def columns_read(options: _Options, reads: tuple[Reads, ...] = VERDICT_READS) -> list[int]:
    """The layout columns an audit with ``options`` extracts, sorted.

    ``verdict``: the union of what every part of ``reads`` that runs under the audit's
    protocol reads. ``all`` and ``gradient-free``: the whole set, whatever the verdict reads.
    """
    feature_set = FeatureSet(options.features)
    if feature_set is not FeatureSet.VERDICT:
        return feature_set.columns
    protocol = str(getattr(options.protocol, "value", options.protocol))
    test = _test_reads(protocol, feature_set, reads)
    out: set[int] = set()
    for r in reads:
        if r.applies(protocol):
            out.update(_named(r.features, feature_set, test))
    return sorted(out)


def features_read(options: _Options, reads: tuple[Reads, ...] = VERDICT_READS) -> tuple[str, ...]:
    """The names of the features an audit with ``options`` extracts, in layout order."""
    return tuple(FEATURE_NAMES[c] for c in columns_read(options, reads))


def tested_columns(options: _Options, reads: tuple[Reads, ...] = VERDICT_READS) -> list[int]:
    """The layout columns the audit's test (and its negative control) sees, sorted.

    Those its protocol's declaration names, among the extracted ones: the directional
    test's candidates, or every extracted feature for a scorer protocol.
    """
    extracted = columns_read(options, reads)
    protocol = str(getattr(options.protocol, "value", options.protocol))
    feature_set = FeatureSet(options.features)
    declared = set(_test_reads(protocol, feature_set, reads))
    return [c for c in extracted if c in declared]


def family_columns(columns: list[int] | tuple[int, ...]) -> dict[str, list[int]]:
    """``columns`` grouped by feature family (families with none left out), in layout order."""
    out: dict[str, list[int]] = {}
    for family, sl in FAMILY_COLUMNS.items():
        mine = [c for c in sorted(columns) if sl.start <= c < sl.stop]
        if mine:
            out[family] = mine
    return out


def timesteps_of(family: str, columns: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """The GM or ML timesteps whose columns are among ``columns``."""
    sl = FAMILY_COLUMNS[family]
    return tuple(t for i, t in enumerate(GM_ML_TIMESTEPS) if sl.start + i in columns)
