"""The options of the statistical test, declared once: protocols, defaults, limits, α's rule.

Pure Python (no numpy, no scipy), so that the command line can build its help and validate
its arguments without loading the statistics. Import them from here: :mod:`cdi.stats` uses
them but does not re-export them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from cdi.errors import InputError

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_EXCEEDANCES",
    "DEFAULT_FIT_FRACTION",
    "DEFAULT_LOOKS",
    "DEFAULT_MAX_PERMUTATIONS",
    "DEFAULT_N_FOLDS",
    "DEFAULT_N_PERMUTATIONS",
    "DEFAULT_PROTOCOL",
    "DEFAULT_SPENDING",
    "FUTILITY_P",
    "MAX_ALPHA",
    "MAX_LOOKS",
    "MIN_CROSSFIT_PER_FOLD",
    "MIN_CROSSFIT_SET",
    "MIN_DIRECTIONAL_SET",
    "MIN_LOOK_SET",
    "MIN_REFERENCE_PART",
    "Protocol",
    "ProtocolOptions",
    "SequentialOptions",
    "SetSizes",
    "Spending",
    "check_alpha",
    "fit_count",
    "minimum_set_size",
    "minimum_sizes",
    "protocol_of",
    "set_size_ok",
]

#: Significance level of the verdict (method §6).
DEFAULT_ALPHA = 0.01
#: α must lie strictly between 0 and this. One rule for every entry point (library, CLI,
#: HTTP form): a level of ½ or more would call a coin flip evidence.
MAX_ALPHA = 0.5
#: Share of each set the reference protocol fits the scorer on *(ref)*.
DEFAULT_FIT_FRACTION = 0.5
#: Folds of the cross-fitted protocol: each scorer sees 80 % of the images.
DEFAULT_N_FOLDS = 5
#: Permutations of the cross-fitted protocol. The smallest attainable p-value is 1/1000, and
#: p < 0.01 needs at most 8 permuted statistics at or above the observed one, so the Monte
#: Carlo error costs little power (with a true p of 0.005 the test still rejects at 0.01 with
#: probability ≈ 0.93; with 199 permutations it would be ≈ 0.37). 999 costs well under a
#: second for 100 + 100 images.
DEFAULT_N_PERMUTATIONS = 999
#: Directional protocol, sequential permutation p-value (Besag & Clifford 1991): permutations
#: are drawn until this many permuted statistics reach the observed one (p = h / L after L
#: draws) ... With h = 100 a p-value near α is resolved to about ±10 %.
DEFAULT_EXCEEDANCES = 100
#: ... or until this many have been drawn (p = (1 + c) / (1 + N)): strong evidence is resolved
#: down to 1 / (1 + 10⁶) < 10⁻⁶. Whether p < α depends only on the first ⌈h / α⌉ draws, so
#: resolving further never changes a verdict.
DEFAULT_MAX_PERMUTATIONS = 1_000_000

#: Reference protocol: the fitting part and the test part of each set hold at least this many
#: images. Five gives Welch's test at least ~4 degrees of freedom and the scorer at least ten
#: fitting rows; with the default fit fraction it means at least 10 images per set.
MIN_REFERENCE_PART = 5
#: Directional protocol: images per set, at least (Welch's t of each feature needs a spread in
#: both sets; below ten a set's mean loss is mostly one or two images).
MIN_DIRECTIONAL_SET = 10
#: Cross-fitted protocol: images per set, at least. Below ten, a permutation test over a few
#: hundred distinct splits is coarse and a fitted scorer is mostly noise.
MIN_CROSSFIT_SET = 10
#: Cross-fitted protocol: each fold holds at least this many images of each set, so that
#: every scorer is fitted on both sets and every fold is tested on both.
MIN_CROSSFIT_PER_FOLD = 2

class Protocol(str, Enum):
    """The statistical protocol of an audit (see the module docstring)."""

    DIRECTIONAL = "directional"
    REFERENCE = "reference"
    CROSSFIT = "crossfit"


#: The protocol of an audit, its negative control and every study, unless one is chosen:
#: declared here once. Chosen by measurement (docs/method.md, "Choosing the default").
DEFAULT_PROTOCOL = Protocol.DIRECTIONAL


@dataclass(frozen=True)
class ProtocolOptions:
    """The parameters of the protocols; each protocol reads only its own.

    ``fit_fraction`` (reference): share of each set the scorer is fitted on, in (0, 1).
    ``n_folds`` (crossfit): K ≥ 2. ``n_permutations`` (crossfit): ≥ 1; together with α it
    must allow p < α, which :func:`crossfit_test` checks. ``exceedances`` and
    ``max_permutations`` (directional): the sequential p-value's stopping rule (h ≥ 1, N ≥ 1;
    N must allow p < α). ``candidates`` (directional): the statistics it takes the largest
    of, each a group of feature columns (indices into the tested columns) whose values are
    expected to be *lower* for a training image; ``None``: those every audit of the 26
    features tests (:meth:`candidates_for`).
    ``combined`` (directional): the mean of the candidates is one more candidate, where
    there are at least two.
    """

    fit_fraction: float = DEFAULT_FIT_FRACTION
    n_folds: int = DEFAULT_N_FOLDS
    n_permutations: int = DEFAULT_N_PERMUTATIONS
    exceedances: int = DEFAULT_EXCEEDANCES
    max_permutations: int = DEFAULT_MAX_PERMUTATIONS
    candidates: tuple[tuple[int, ...], ...] | None = None
    combined: bool = True
    #: Directional protocol: images per set, at least (``None``: :data:`MIN_DIRECTIONAL_SET`).
    #: A sequential audit's looks use :data:`MIN_LOOK_SET`.
    min_set: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fit_fraction < 1.0:
            raise InputError(f"fit_fraction must lie strictly between 0 and 1, got {self.fit_fraction}")
        if self.n_folds < 2:
            raise InputError(f"n_folds must be at least 2, got {self.n_folds}")
        if self.n_permutations < 1:
            raise InputError(f"n_permutations must be at least 1, got {self.n_permutations}")
        if self.exceedances < 1:
            raise InputError(f"exceedances must be at least 1, got {self.exceedances}")
        if self.max_permutations < 1:
            raise InputError(f"max_permutations must be at least 1, got {self.max_permutations}")
        if self.min_set is not None and self.min_set < 3:
            raise InputError(f"min_set must be at least 3, got {self.min_set}")
        if self.candidates is not None:
            groups = tuple(tuple(int(c) for c in group) for group in self.candidates)
            if not groups or any(not g or min(g) < 0 for g in groups):
                raise InputError("candidates must be non-empty groups of non-negative column indices")
            object.__setattr__(self, "candidates", groups)

    def candidates_for(self, n_columns: int) -> tuple[tuple[int, ...], ...]:
        """The candidate groups of a test of ``n_columns`` feature columns.

        ``candidates`` if given; else, for the layout's 26 columns, the loss-type member
        candidates an audit of every feature tests (so that the library's default test is the
        audit's); else each column alone.
        """
        if self.candidates is not None:
            return self.candidates
        from cdi.features.layout import FEATURE_NAMES, member_candidates

        if n_columns == len(FEATURE_NAMES):
            return member_candidates(tuple(range(n_columns)))[1]
        return tuple((j,) for j in range(n_columns))


def protocol_of(protocol: Protocol | str) -> Protocol:
    """``protocol`` as a :class:`Protocol`; :class:`InputError` naming the choices if unknown."""
    try:
        return Protocol(protocol)
    except ValueError:
        choices = ", ".join(p.value for p in Protocol)
        raise InputError(f"unknown protocol {protocol!r}; choose one of: {choices}") from None


def fit_count(n: int, fit_fraction: float) -> int:
    """Images of a set of ``n`` the reference protocol fits its scorer on."""
    # Round half up, so that 0.5 of an odd set puts the extra image in the fitting part
    # deterministically (not by banker's rounding).
    return math.floor(fit_fraction * n + 0.5)


def set_size_ok(n: int, protocol: Protocol, options: ProtocolOptions) -> bool:
    """Whether one set of ``n`` images is enough for ``protocol`` with ``options``."""
    if protocol is Protocol.DIRECTIONAL:
        return n >= (MIN_DIRECTIONAL_SET if options.min_set is None else options.min_set)
    if protocol is Protocol.REFERENCE:
        n_fit = fit_count(n, options.fit_fraction)
        return min(n_fit, n - n_fit) >= MIN_REFERENCE_PART
    return n >= max(MIN_CROSSFIT_SET, MIN_CROSSFIT_PER_FOLD * options.n_folds)


def minimum_set_size(protocol: Protocol | str, options: ProtocolOptions | None = None) -> int:
    """The fewest images one set may hold for ``protocol`` with ``options``.

    Directional: ≥ :data:`MIN_DIRECTIONAL_SET`. Reference: each set's fitting and test parts
    hold ≥ :data:`MIN_REFERENCE_PART` images (10 per set at the default fit fraction).
    Crossfit: ≥ :data:`MIN_CROSSFIT_SET` and ≥ :data:`MIN_CROSSFIT_PER_FOLD` per fold (10 at
    the default 5 folds).
    """
    proto = protocol_of(protocol)
    opts = options or ProtocolOptions()
    n = 2
    while not set_size_ok(n, proto, opts):
        n += 1
    return n


@dataclass(frozen=True)
class SetSizes:
    """The fewest published (``p``) and unpublished (``u``) images an audit accepts."""

    p: int
    u: int


def minimum_sizes(protocol: Protocol | str = DEFAULT_PROTOCOL, options: ProtocolOptions | None = None, *,
                  negative_control: bool = True) -> SetSizes:
    """The fewest images of P and of U for ``protocol``: the one statement of the minimum that the
    size check, its error messages, the planner and the service's form all read.

    With ``negative_control`` (every audit runs it) U also splits into two halves that are
    each tested like a set, so U needs about twice :func:`minimum_set_size`.
    """
    proto = protocol_of(protocol)
    opts = options or ProtocolOptions()
    p = u = minimum_set_size(proto, opts)
    while negative_control and not set_size_ok(u // 2, proto, opts):
        u += 1
    return SetSizes(p, u)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float if 0 < α < :data:`MAX_ALPHA`; else :class:`InputError`.

    The one rule for α: the library, the command line and the HTTP form all call this.
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number, got {alpha!r}") from None
    if not 0.0 < value < MAX_ALPHA:
        raise InputError(f"alpha must lie strictly between 0 and {MAX_ALPHA}, got {alpha}")
    return value


class Spending(str, Enum):
    """How a sequential audit spends α over its looks (Lan & DeMets 1983 spending functions).

    ``obrien-fleming``: α(t) = 2 − 2Φ(z₁₋α/₂ / √t), almost nothing early, most of α at the
    last look. ``pocock``: α(t) = α·ln(1 + (e − 1)t), about evenly, so early looks stop more
    often and the last look keeps less.
    """

    OBRIEN_FLEMING = "obrien-fleming"
    POCOCK = "pocock"


#: Looks of a sequential audit, unless chosen: after 25 %, 50 %, 75 % and 100 % of each set.
DEFAULT_LOOKS = 4
#: At most this many looks: each costs a permutation test, and more looks spend α thinner.
MAX_LOOKS = 10
#: Chosen by measurement (docs/method.md, "Sequential audits").
DEFAULT_SPENDING = Spending.OBRIEN_FLEMING
#: A sequential audit's look tests at least this many images per set, and its negative
#: control halves at least this many: the smallest sets whose permutation p-value can fall
#: below 0.01 at all (5 + 5 images have 252 labellings, so p ≥ 1/252 ≈ 0.004). Looks that
#: would hold fewer are merged into the next one.
MIN_LOOK_SET = 5
#: With futility stopping, a look before the last whose p-value is at least this ends the
#: audit ``not_detected``: P does not even lean towards "trained on".
FUTILITY_P = 0.5


@dataclass(frozen=True)
class SequentialOptions:
    """A sequential audit's design (method §10, "Sequential audits"); off unless ``enabled``.

    The images are extracted in ``looks`` rounds, P and U interleaved; after each round the
    directional test runs on the images so far, at the nominal level the ``spending`` rule
    gives that look; the audit stops ``used`` at the first look below it whose controls pass.
    With ``futility``, a look before the last with p ≥ :data:`FUTILITY_P` stops it
    ``not_detected``.
    """

    enabled: bool = False
    looks: int = DEFAULT_LOOKS
    spending: Spending = DEFAULT_SPENDING
    futility: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.looks, bool) or not isinstance(self.looks, int):
            raise InputError(f"looks must be an integer, got {self.looks!r}")
        if not 1 <= self.looks <= MAX_LOOKS:
            raise InputError(f"looks must lie between 1 and {MAX_LOOKS}, got {self.looks}")
        try:
            object.__setattr__(self, "spending", Spending(self.spending))
        except ValueError:
            choices = ", ".join(s.value for s in Spending)
            raise InputError(f"unknown spending rule {self.spending!r}; choose one of: {choices}") from None
