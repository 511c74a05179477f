"""The audit report: a typed, versioned document built from an :class:`~cdi.audit.AuditResult`.

The report is what a data owner takes to a third party. It holds everything needed to check
its numbers without the images or the model: the verdict and the test, the controls, one row
per image (SHA-256, set, role, fold, 26 features, score) and a manifest (model identity and
weight hashes, feature layout and parameters, seeds, options, library versions, device,
timings, pass counts). Its JSON Schema is generated from these classes
(:func:`json_schema`) and published as ``cdi/report/schema/cdi-report-1.schema.json``.

Numbers are IEEE-754 doubles written with enough digits to read back exactly, so the test
can be rerun bit for bit from the file (``cdi recompute``). Values that may be infinite (a
statistic whose samples have no spread) are written as the strings ``"Infinity"``,
``"-Infinity"`` or ``"NaN"``, since JSON has no such numbers. A feature that was not computed
is ``null``, and ``feature_layout.computed`` names those that were (the audit's feature set:
by default only what the verdict reads).

Changing the meaning or the shape of a field means a new ``schema_version``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from cdi.options import DEFAULT_LOOKS, DEFAULT_SPENDING
from cdi.report.errors import ReportFormatError

if TYPE_CHECKING:
    from cdi.audit import AuditResult
    from cdi.options import ProtocolOptions
    from cdi.stats import ProtocolResult

__all__ = [
    "SCHEMA_ID",
    "SCHEMA_VERSION",
    "AuditOptionsRecord",
    "ControlRow",
    "Controls",
    "Decision",
    "DescriptorDifference",
    "DirectionCheck",
    "DistributionCheck",
    "DuplicateGroup",
    "DuplicatePair",
    "Duplicates",
    "Excluded",
    "FeatureLayout",
    "ImageRef",
    "ImageRow",
    "Integrity",
    "LookRecord",
    "Manifest",
    "ModelRecord",
    "NegativeControl",
    "Passes",
    "ProtocolRun",
    "Report",
    "Seeds",
    "SequentialRecord",
    "ShiftControl",
    "Signature",
    "StatisticDifference",
    "build_report",
    "json_schema",
    "parse_report",
]

SCHEMA_VERSION: Literal["cdi-report/1"] = "cdi-report/1"
SCHEMA_ID = "urn:cdi-audit:schema:cdi-report-1"

_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _read_extended(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def _write_extended(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


#: A double that may be infinite or NaN: a JSON number, or one of three strings.
ExtendedFloat = Annotated[
    float,
    BeforeValidator(_read_extended),
    PlainSerializer(_write_extended, return_type=Any, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"enum": ["Infinity", "-Infinity", "NaN"]}]}),
]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
SetName = Literal["P", "U"]
Outcome = Literal["used", "not_detected", "inconclusive"]
Direction = Literal["P>U", "P<U", "P=U"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- the test -----------------------------------------------------------------------------


class ProtocolRun(_Model):
    """One run of the statistical protocol (the audit's test, or the negative control's)."""

    protocol: Literal["directional", "reference", "crossfit"] = Field(
        description="directional: the largest Welch t over the loss-type features (lower for training "
                    "images), with a sequential permutation p-value; reference: split, fit, score, Welch's "
                    "t-test; crossfit: K-fold cross-fitted scores and a permutation test that reruns the "
                    "whole procedure")
    statistic_name: Literal["welch_t", "max_welch_t"]
    statistic: ExtendedFloat = Field(description="Welch's t of the test scores, P minus U (directional: the "
                                                 "largest over the tested features, which the scores carry)")
    df: FiniteFloat | None = Field(description="Welch–Satterthwaite degrees of freedom (reference); "
                                               "null for the permutation tests")
    p_value: Probability = Field(description="one-sided p-value (H1: P scores higher than U)")
    alternative: Literal["greater"]
    direction: Direction = Field(description="observed sign of the difference")
    auc: Probability = Field(description="AUC of P's test scores against U's (ties count one half)")
    cohens_d: ExtendedFloat = Field(description="Cohen's d of the test scores, pooled standard deviation")
    mean_score_p: FiniteFloat
    mean_score_u: FiniteFloat
    n_p: Count
    n_u: Count
    n_fit_p: Count = Field(description="P images that fitted a scorer")
    n_fit_u: Count
    n_test_p: Count = Field(description="P images whose score entered the statistic")
    n_test_u: Count
    alpha: FiniteFloat = Field(gt=0.0, lt=1.0)
    fit_fraction: FiniteFloat | None = Field(description="reference protocol: share of each set fitted on")
    n_folds: int | None = Field(description="crossfit: number of folds K")
    n_permutations: int | None = Field(description="crossfit: number of label permutations; directional: the "
                                                    "permutations drawn before the sequential p-value stopped")
    random_state: Count = Field(description="the seed the protocol ran with")
    selected_feature: str | None = Field(
        default=None, description="directional: the candidate (a loss-type feature, or the average of a family's "
                                  "timesteps) with the largest t, whose standardised values are the scores")
    exceedances: int | None = Field(
        default=None, description="directional: permuted statistics at or above the observed one among those "
                                  "drawn")
    max_permutations: int | None = Field(
        default=None, description="directional: the most permutations the sequential p-value may draw")
    p_value_floor: Probability | None = Field(
        default=None, description="the smallest p-value the test could give: 1/(1 + permutations) for the "
                                  "permutation tests; null for the parametric reference test")

    @classmethod
    def of(cls, result: ProtocolResult, candidate_names: Sequence[str] = ()) -> ProtocolRun:
        """The record of ``result``; ``candidate_names`` name the directional protocol's candidates."""
        selected = result.selected_column
        return cls(
            protocol=result.protocol.value, statistic_name=result.statistic_name,  # type: ignore[arg-type]
            statistic=float(result.statistic), df=None if result.df is None else float(result.df),
            p_value=float(result.p_value), alternative=result.alternative, direction=result.direction,
            auc=float(result.auc), cohens_d=float(result.cohens_d), mean_score_p=float(result.mean_score_p),
            mean_score_u=float(result.mean_score_u), n_p=result.n_p, n_u=result.n_u, n_fit_p=result.n_fit_p,
            n_fit_u=result.n_fit_u, n_test_p=result.n_test_p, n_test_u=result.n_test_u, alpha=float(result.alpha),
            fit_fraction=None if result.fit_fraction is None else float(result.fit_fraction),
            n_folds=result.n_folds, n_permutations=result.n_permutations, random_state=int(result.random_state),
            selected_feature=None if selected is None else candidate_names[selected],
            exceedances=result.exceedances, max_permutations=result.max_permutations,
            p_value_floor=result.p_value_floor,
        )


class Decision(_Model):
    """How the verdict follows from the test and the controls (method §8)."""

    rule: Literal["cdi-verdict/1", "cdi-verdict/2"] = Field(
        description="cdi-verdict/2: inconclusive if the negative control is significant (p < alpha) or the "
                    "direction check fails (p < alpha), or if the test is significant and either the shift "
                    "control (p < alpha_shift) or the distribution check (p < alpha_control and AUC >= "
                    "auc_threshold) finds that P and U differ; else used if the test and the difficulty-"
                    "calibrated test are both significant; else not_detected. cdi-verdict/1 (older reports): "
                    "the distribution check alone could make any audit inconclusive, and there was no "
                    "calibrated test or shift control")
    alpha: FiniteFloat = Field(gt=0.0, lt=1.0, description="significance level of the test")
    alpha_control: FiniteFloat = Field(gt=0.0, lt=1.0, description="significance level of the distribution check")
    auc_threshold: FiniteFloat = Field(ge=0.5, le=1.0,
                                       description="smallest distribution-check AUC that counts as a shift")
    test_significant: bool = Field(description="p < alpha and P scored higher than U")
    negative_control_failed: bool
    direction_check_failed: bool
    distribution_shift: bool
    calibrated_significant: bool | None = Field(
        default=None, description="the difficulty-calibrated test's p < alpha with P higher; null where it did "
                                  "not run")
    shift_failed: bool = Field(default=False, description="the test is significant and the shift control found "
                                                          "that the way P and U differ predicts it")


# --- controls ------------------------------------------------------------------------------


class ControlRow(_Model):
    """One image of U in the negative control: which half it played and its score there."""

    u_index: Count = Field(description="position of the image among the report's U rows")
    plays: SetName = Field(description="the half it was put in: P (first half) or U")
    role: Literal["fit", "test"]
    fold: int | None
    score: FiniteFloat | None


class NegativeControl(_Model):
    """The protocol rerun on two random halves of U (method §7); should look like Uniform(0,1)."""

    p_value: Probability
    significant: bool = Field(description="p < alpha: the controls fail and the verdict is inconclusive")
    split_random_state: Count = Field(description="seed of the split of U into halves")
    half_p: list[Count] = Field(description="positions in U of the half that played P")
    half_u: list[Count] = Field(description="positions in U of the half that played U")
    test: ProtocolRun
    rows: list[ControlRow]


class DirectionCheck(_Model):
    """Do P's images look *less* like training data than U's? (method §7, ``cdi.controls.direction_check``)

    The scorer learns whatever separates P from U, so swapped sets, or a U holding training
    images, would otherwise read as "used". The check compares a fixed-direction index of the
    loss-type features (lower for training images) between the sets.
    """

    p_value: Probability | None = Field(
        description="one-sided p-value of \"P's loss-type features are higher than U's\"; null if not run")
    failed: bool = Field(description="p < alpha: the controls fail and the verdict is inconclusive")
    features: list[str] = Field(description="the loss-type features of the index")


class StatisticDifference(_Model):
    name: str
    cohens_d: ExtendedFloat = Field(description="P minus U")
    auc: Probability


class DistributionCheck(_Model):
    """Can a model-free classifier tell P from U by simple image statistics? (method §7)"""

    auc: Probability = Field(description="out-of-fold AUC of the classifier (0.5 = chance)")
    p_value: Probability = Field(description="permutation p-value of that AUC")
    shift: bool = Field(description="p < alpha_control and AUC >= auc_threshold: the controls fail")
    warning: bool = Field(description="significant, but the AUC is below the threshold: reported only")
    n_p: Count
    n_u: Count
    n_folds: Count
    n_permutations: Count
    random_state: Count
    statistic_names: list[str]
    largest_differences: list[StatisticDifference]


class ImageRef(_Model):
    set: SetName
    index: Count = Field(description="position in the set as submitted (before exclusions)")
    name: str


class DuplicatePair(_Model):
    kind: Literal["exact", "perceptual"]
    scope: Literal["within_P", "within_U", "between"]
    first: ImageRef
    second: ImageRef
    distance: Count = Field(description="Hamming distance of the 64-bit perceptual hashes (reported, not decisive)")
    difference: NonNegativeFloat = Field(
        0.0, description="aligned pixel difference that verified the pair (RMS levels of 255; 0 if exact)")


class DuplicateGroup(_Model):
    kind: Literal["exact", "perceptual"]
    scope: Literal["within_P", "within_U", "between"]
    members: list[ImageRef]


class Duplicates(_Model):
    difference_threshold: float = Field(
        description="largest aligned pixel difference (RMS levels of 255) of a perceptual duplicate; < 0: off")
    candidate_distance: NonNegativeFloat = Field(
        description="largest distance of the 8x8 sketches (RMS grey levels) of a pair worth verifying")
    pairs: list[DuplicatePair]
    groups: list[DuplicateGroup]


class Excluded(_Model):
    """Submitted images left out of the audit (positions as submitted), and why."""

    p: list[Count]
    u: list[Count]
    reasons: list[str]


class DescriptorDifference(_Model):
    name: str = Field(description="the descriptor (cdi.calibration.DESCRIPTOR_NAMES)")
    mean_p: FiniteFloat
    mean_u: FiniteFloat
    cohens_d: FiniteFloat = Field(description="P minus U")
    contribution: FiniteFloat = Field(description="its part of the predicted member-likeness difference, P minus "
                                                  "U, in standard deviations; positive: it makes P look used")
    words: str = Field(description="the difference in plain words")


class ShiftControl(_Model):
    """Does the way P and U differ predict that P looks more like training data? (method §8.2)

    The combined member-likeness candidate is regressed (ridge, no labels) on the images'
    model-free descriptors; Welch's t compares the predictions of P and U, one-sided.
    """

    p_value: Probability = Field(description="one-sided p-value of \"the descriptors predict P more member-like\"")
    statistic: ExtendedFloat = Field(description="Welch's t of the predictions, P minus U")
    alpha_shift: FiniteFloat = Field(gt=0.0, lt=1.0, description="the control's level")
    ridge: FiniteFloat = Field(gt=0.0, description="ridge penalty per image on the standardised descriptors")
    failed: bool = Field(description="p < alpha_shift while the test is significant: the verdict is inconclusive")
    descriptor_names: list[str]
    differences: list[DescriptorDifference] = Field(description="largest contribution first")
    words: str = Field(description="how P and U differ, in plain words")
    fix: str = Field(description="what would make P and U comparable")
    candidate: str | None = Field(default=None, description="the candidate whose predicted difference is the most "
                                                            "significant (p_value is Bonferroni over the candidates)")
    class_p: Probability | None = Field(default=None, description="class-conditional models: permutation p-value "
                                                                  "of \"P and U hold the same classes\"")
    class_words: str | None = None
    random_state: Count = Field(default=0, description="seed of the permutations")


class Controls(_Model):
    negative_control: NegativeControl
    direction_check: DirectionCheck
    distribution_check: DistributionCheck
    duplicates: Duplicates
    excluded: Excluded
    shift_control: ShiftControl | None = Field(default=None, description="null in reports before cdi-verdict/2")


# --- sequential audits ----------------------------------------------------------------------


class LookRecord(_Model):
    """One look of a sequential audit: the directional test on the first images of each set."""

    n_p: Count = Field(description="P images tested: the report's P rows 0 .. n_p - 1")
    n_u: Count = Field(description="U images tested: the report's U rows 0 .. n_u - 1")
    fraction: Probability = Field(description="share of all submitted images looked at (information fraction)")
    spent_alpha: Probability = Field(description="alpha spent by this look, alpha(fraction)")
    level: Probability = Field(description="the look's boundary: it crosses when its p-value is below this")
    test: ProtocolRun = Field(description="the look's directional test, with its own permutation p-value")
    crossed: bool = Field(description="p < level and P scored higher")
    controls_passed: bool | None = Field(description="for a crossing look: whether its controls passed on its "
                                                     "images (a look whose controls fail does not stop the audit)")
    futile: bool = Field(description="futility stopping is on, this is not the last look, and p >= futility_p")


class SequentialRecord(_Model):
    """How a sequential audit looked, spent alpha and stopped (method §10, sequential audits).

    Each look tests only images extracted by then; the looks' levels sum to alpha, so the
    false-positive rate is at most alpha however the audit stops (union bound). The report's
    images are those used; `unused` lists those never extracted.
    """

    spending: Literal["obrien-fleming", "pocock"]
    planned_looks: Count = Field(description="looks asked for; looks smaller than min_look_set are merged")
    min_look_set: Count = Field(description="the fewest images of a set a look tests")
    futility: bool
    futility_p: Probability = Field(description="with futility: a look before the last with p >= this stops "
                                                "the audit not_detected")
    looks: list[LookRecord] = Field(description="the looks taken, in order; the last one stopped the audit")
    planned: list[list[Count]] = Field(description="[n_p, n_u] of every planned look")
    stop: Literal["boundary", "futility", "final"] = Field(
        description="boundary: a look crossed and its controls passed; futility; final: the last look was reached")
    p_value: Probability = Field(description="min over the looks of p_k / w_k, w_k = level_k / alpha (weighted "
                                             "Bonferroni): below alpha exactly when a look crossed")
    submitted_p: Count = Field(description="P images submitted (after exclusions)")
    submitted_u: Count
    order_random_state: list[Count] = Field(description="seed of the random order of each set ([seed, 3])")
    unused: list[ImageRef] = Field(description="images never extracted because the audit stopped first, "
                                               "indices continuing the report's rows of their set")
    unused_sha256: list[Sha256] = Field(description="the SHA-256 of each unused image, in the same order")


# --- images --------------------------------------------------------------------------------


class FeatureLayout(_Model):
    version: str = Field(description="version of the 26-feature layout")
    names: list[str] = Field(description="the 26 feature names, in the order of every row's features")
    used: list[str] = Field(description="the features the test used")
    computed: list[str] | None = Field(
        default=None, description="the features the audit extracted (its feature set: options.features); every "
                                  "other feature of a row is null because it was not computed, not for want of a "
                                  "value. Absent from reports made before the audits extracted by need: then "
                                  "every non-null feature")


class ImageRow(_Model):
    """One audited image: anyone can recompute the test from these rows alone."""

    name: str
    sha256: Sha256 = Field(description="SHA-256 of the image file's bytes")
    set: SetName = Field(description="P: published; U: unpublished")
    index: Count = Field(description="position in its set as tested (after exclusions)")
    role: Literal["fit", "test"] = Field(description="test: its score entered the statistic")
    fold: int | None = Field(description="crossfit: the fold that scored it")
    score: FiniteFloat | None = Field(description="the scoring model's probability of P; null if only fitted on")
    features: list[FiniteFloat | None] = Field(description="the 26 features in layout order; null where not computed")
    descriptors: list[FiniteFloat] | None = Field(
        default=None, description="model-free descriptors of the image as the model saw it "
                                  "(cdi.calibration.DESCRIPTOR_NAMES); null in reports before cdi-verdict/2")


# --- manifest ------------------------------------------------------------------------------


class ModelRecord(_Model):
    """The audited model: where it came from and the exact weights."""

    source: str = Field(description="the model's name: the service's registered id, a shipped model's name, a hub id "
                                    "or a directory (as given to the library)")
    revision: str | None
    digest: Sha256 = Field(description="SHA-256 over the family and the sorted weight hashes")
    weight_sha256: dict[str, Sha256] = Field(description="SHA-256 of every weight file")
    family: str
    conditioning: str
    image_channels: int
    image_size: int
    num_train_timesteps: int
    device: str
    dtype: str
    noise_schedule: Literal["ddpm", "flow"] | None = Field(
        default=None, description="ddpm: z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε; flow: z_t = (1−σ_t)·z0 + σ_t·ε (method §10.1)")
    prediction_type: str | None = Field(
        default=None, description="what the network predicts: epsilon, v_prediction, sample or flow")
    flow_sigmas: dict[str, FiniteFloat] | None = Field(
        default=None, description="flow models: the σ used at each grid timestep the features evaluated "
                                  "(after the scheduler's shift; t = 0 is the smallest σ it allows)")
    details: dict[str, Any] = Field(default_factory=dict, description="further facts the model's adapter gave")


class AuditOptionsRecord(_Model):
    """Every option of the audit (``cdi.audit.AuditOptions``)."""

    alpha: FiniteFloat
    protocol: Literal["directional", "reference", "crossfit"]
    features: Literal["verdict", "all", "gradient-free"] = Field(
        description="verdict: only the features the verdict reads; all: the 26; gradient-free: no gradient families")
    seed: Count
    device: str
    dtype: str
    batch_size: int | None = Field(description="images per batch; null: sized from the accelerator's memory")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="fp32", description="the network passes' arithmetic (fp32 in reports made before it was an option)")
    fit_fraction: FiniteFloat
    n_folds: int
    n_permutations: int
    max_permutations: int = Field(default=1_000_000, description="directional: most permutations drawn")
    exceedances: int = Field(default=100, description="directional: permuted statistics at or above the "
                                                      "observed one after which sampling stops")
    duplicate_threshold: float
    feature_config: dict[str, Any] = Field(description="parameters of the 26 features")
    sequential: bool = Field(default=False, description="a sequential audit: looks in rounds, may stop early")
    looks: int = Field(default=DEFAULT_LOOKS, description="sequential: planned looks")
    spending: Literal["obrien-fleming", "pocock"] = Field(default=DEFAULT_SPENDING.value,
                                                          description="sequential: alpha-spending rule")
    futility: bool = Field(default=False, description="sequential: stop not_detected for futility")

    def protocol_options(self, used: Sequence[str] | None = None, **changes: Any) -> ProtocolOptions:
        """The test's options as the audit ran it (``cdi.audit.AuditOptions.protocol_options``).

        ``used``: the names of the features the test used (the report's ``feature_layout.used``);
        by default those the options give.
        """
        from cdi.features.layout import FEATURE_NAMES, member_candidates
        from cdi.options import ProtocolOptions
        from cdi.reads import tested_columns

        columns = tested_columns(self) if used is None else [FEATURE_NAMES.index(n) for n in used]
        fields: dict[str, Any] = {
            "fit_fraction": self.fit_fraction, "n_folds": self.n_folds, "n_permutations": self.n_permutations,
            "exceedances": self.exceedances, "max_permutations": self.max_permutations,
            "candidates": member_candidates(columns)[1],
        }
        return ProtocolOptions(**{**fields, **changes})


class Seeds(_Model):
    """Every seed of the audit, as actually used."""

    audit: Count = Field(description="the audit's seed (options.seed); features use it too")
    test: Count
    negative_control_split: Count
    negative_control_test: Count
    distribution_check: Count


class Passes(_Model):
    forward: Count
    backward: Count
    cached_images: Count = Field(description="images whose features came from the feature store")


class Manifest(_Model):
    """What is needed to rerun the audit bit for bit."""

    model: ModelRecord
    options: AuditOptionsRecord
    feature_key: Sha256 = Field(description="identity of the stored features (model, layout, parameters, seed)")
    seeds: Seeds
    versions: dict[str, str] = Field(description="library versions (torch, diffusers, numpy, ..., cdi-audit)")
    device: str = Field(description="device the features were computed on")
    timings_seconds: dict[str, FiniteFloat] = Field(description="wall-clock time of each stage")
    passes: Passes


# --- integrity -----------------------------------------------------------------------------


class Signature(_Model):
    algorithm: Literal["ed25519"]
    public_key: str = Field(description="the raw 32-byte Ed25519 public key, base64")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="first 16 hex digits of SHA-256(public key)")
    value: str = Field(description='base64 signature of the ASCII message "cdi-report/1 sha256:" + digest')


class Integrity(_Model):
    canonicalization: Literal["jcs-rfc8785"] = Field(
        description="the digest is SHA-256 of the RFC 8785 canonical JSON of the whole document "
                    "without its `integrity` and `service` members")
    digest_algorithm: Literal["sha256"]
    digest: Sha256
    signature: Signature | None = None


# --- the report ----------------------------------------------------------------------------


class Planning(_Model):
    """How many images would have detected the observed effect (``cdi.planning``), for not_detected audits."""

    n_per_set: Count | None = Field(description="published images for the planned power (null: not reachable "
                                                 "within the planner's range)")
    additional_published: Count | None = Field(description="published images beyond this audit's")
    interval: list[Count | None] = Field(description="percentile interval of n_per_set over bootstrap resamples")
    confidence: Probability
    power: Probability
    u_ratio: FiniteFloat = Field(description="unpublished images per published image in the plan")
    power_now: Probability = Field(description="estimated power of this audit's own sizes")
    summary: str


class Report(_Model):
    """A CDI audit report, schema cdi-report/1: whether a diffusion model was trained on a data
    owner's published images (P), tested against images it cannot have seen (U), with the
    controls, every image's features and score, and everything needed to rerun the audit.
    integrity.digest is the SHA-256 of the RFC 8785 canonical JSON of the whole document
    without its integrity and service members."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", title="CDI audit report",
        json_schema_extra={"$id": SCHEMA_ID, "$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    schema_version: Literal["cdi-report/1"]
    verdict: Outcome = Field(description="used | not_detected (never proof of non-use) | inconclusive")
    p_value: Probability = Field(description="the verdict's one-sided p-value: the larger of test.p_value and "
                                             "calibrated_test.p_value (test.p_value where there is none)")
    alpha: FiniteFloat = Field(gt=0.0, lt=1.0, description="significance level")
    reason: str = Field(description="one paragraph saying why, with the numbers")
    warnings: list[str]
    created_at: datetime = Field(description="when the report was built (UTC)")
    test: ProtocolRun
    calibrated_test: ProtocolRun | None = Field(
        default=None, description="the directional test on what the images' descriptors cannot explain of each "
                                  "candidate (cdi.assess.calibrated_test); null for other protocols and older "
                                  "reports")
    decision: Decision
    controls: Controls
    feature_layout: FeatureLayout
    images: list[ImageRow] = Field(description="every audited image, P first, then U, each in tested order")
    manifest: Manifest
    planning: Planning | None = Field(
        default=None, description="not_detected audits: the images per set that would detect the effect these "
                                  "images showed (cdi plan)")
    sequential: SequentialRecord | None = Field(
        default=None, description="sequential audits: the looks, their boundaries, and the images not used")
    integrity: Integrity | None = None
    service: dict[str, Any] | None = Field(
        default=None, description="delivery metadata a service attaches; not covered by the digest")

    @model_validator(mode="after")
    def _consistent(self) -> Report:
        problems = []
        t, d = self.test, self.decision
        expected_p = t.p_value if self.calibrated_test is None else max(t.p_value, self.calibrated_test.p_value)
        if self.p_value != expected_p:
            problems.append("p_value differs from the larger of test.p_value and calibrated_test.p_value")
        c = self.calibrated_test
        if (d.calibrated_significant is not None and c is not None
                and d.calibrated_significant != (c.p_value < c.alpha and c.statistic > 0)):
            problems.append("decision.calibrated_significant does not follow from the calibrated test")
        shift_control = self.controls.shift_control
        if d.shift_failed != (shift_control is not None and shift_control.failed):
            problems.append("decision.shift_failed differs from the shift control")
        if not self.alpha == t.alpha == d.alpha:
            problems.append("alpha differs between the report, its test and its decision")
        if d.test_significant != (t.p_value < t.alpha and t.statistic > 0):
            problems.append("decision.test_significant does not follow from the test")
        if d.negative_control_failed != self.controls.negative_control.significant:
            problems.append("decision.negative_control_failed differs from the negative control")
        if d.direction_check_failed != self.controls.direction_check.failed:
            problems.append("decision.direction_check_failed differs from the direction check")
        if d.distribution_shift != self.controls.distribution_check.shift:
            problems.append("decision.distribution_shift differs from the distribution check")
        expected = expected_outcome(d)
        if self.verdict != expected:
            problems.append(f"the verdict is {self.verdict} but the decision rule gives {expected}")
        width = len(self.feature_layout.names)
        if any(len(r.features) != width for r in self.images):
            problems.append(f"an image row does not hold {width} features")
        layout = self.feature_layout
        if layout.computed is not None:
            unknown = [n for n in [*layout.computed, *layout.used] if n not in layout.names]
            if unknown:
                problems.append(f"feature_layout names unknown features: {', '.join(unknown)}")
            elif not set(layout.used) <= set(layout.computed):
                problems.append("the test used features the audit did not compute")
            else:
                absent = [i for i, n in enumerate(layout.names) if n not in layout.computed]
                if any(r.features[i] is not None for r in self.images if len(r.features) == width for i in absent):
                    problems.append("an image row holds a value for a feature the audit did not compute")
        counts = {s: sum(1 for r in self.images if r.set == s) for s in ("P", "U")}
        if (counts["P"], counts["U"]) != (t.n_p, t.n_u):
            problems.append(f"{counts['P']} P rows and {counts['U']} U rows, but the test counted {t.n_p} and {t.n_u}")
        for s in ("P", "U"):
            indices = [r.index for r in self.images if r.set == s]
            if indices != list(range(len(indices))):
                problems.append(f"the {s} rows are not numbered 0, 1, ... in order")
        seq = self.sequential
        if seq is not None:
            if seq.p_value != t.p_value:
                problems.append("sequential.p_value differs from test.p_value")
            if not seq.looks or (seq.looks[-1].n_p, seq.looks[-1].n_u) != (t.n_p, t.n_u):
                problems.append("the last look did not test the report's images")
            if len(seq.unused) != len(seq.unused_sha256):
                problems.append("sequential.unused and unused_sha256 differ in length")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def digest(self) -> str | None:
        return self.integrity.digest if self.integrity else None

    def to_document(self) -> dict[str, Any]:
        """The report as JSON data (what is written to the file and what the digest covers)."""
        return self.model_dump(mode="json")

    def rows(self, set_name: SetName) -> list[ImageRow]:
        return [r for r in self.images if r.set == set_name]

    def all_features(self) -> tuple[np.ndarray, np.ndarray]:
        """All 26 features of P ``[n_p, 26]`` and U ``[n_u, 26]`` (NaN where not computed).

        Built exactly as :func:`cdi.audit.audit` builds them (one matrix of every image, then
        each set's rows), memory layout included: floating-point results can depend on the
        layout in their last bits, and a recomputation must reproduce them bit for bit.
        """
        width = len(self.feature_layout.names)
        features = np.array([[np.nan if v is None else v for v in r.features] for r in self.images],
                            dtype=np.float64).reshape(len(self.images), width)
        is_p = np.array([r.set == "P" for r in self.images])
        return features[is_p], features[~is_p]

    def used_features(self) -> tuple[np.ndarray, np.ndarray]:
        """The features the test used: P's ``[n_p, k]`` and U's ``[n_u, k]``, rows in tested order.

        Laid out as the audit lays them out (see :meth:`all_features`). Raises
        :class:`ReportFormatError` if an image lacks one of them.
        """
        names = self.feature_layout.names
        cols = [names.index(n) for n in self.feature_layout.used]
        fp, fu = self.all_features()
        xp, xu = fp[:, cols], fu[:, cols]
        for x, set_name in ((xp, "P"), (xu, "U")):
            if np.isnan(x).any():
                row = int(np.argwhere(np.isnan(x))[0][0])
                raise ReportFormatError(f"image {set_name}[{row}] lacks one of the features the test used")
        return xp, xu


def expected_outcome(decision: Decision) -> Outcome:
    """The verdict the decision rule gives for these flags."""
    if (decision.negative_control_failed or decision.direction_check_failed or decision.distribution_shift
            or decision.shift_failed):
        return "inconclusive"
    confirmed = decision.calibrated_significant is not False
    return "used" if decision.test_significant and confirmed else "not_detected"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Report`, as published in ``cdi/report/schema/``."""
    return Report.model_json_schema(mode="validation")


def parse_report(document: Mapping[str, Any]) -> Report:
    """Validate JSON data as a report; raises :class:`ReportFormatError` naming the problems."""
    from pydantic import ValidationError

    if not isinstance(document, Mapping):
        raise ReportFormatError("a report is a JSON object")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportFormatError(
            f"unknown report schema {version!r}: this version of cdi-audit reads {SCHEMA_VERSION}"
            if version is not None else "not a CDI report: it has no schema_version")
    try:
        return Report.model_validate(dict(document))
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:8]:
            where = ".".join(str(p) for p in err["loc"]) or "report"
            lines.append(f"{where}: {err['msg']}")
        more = f" (and {exc.error_count() - 8} more)" if exc.error_count() > 8 else ""
        raise ReportFormatError("the report does not match its schema: " + "; ".join(lines) + more) from None


# --- building ------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def _refs(members: Sequence[Any]) -> list[ImageRef]:
    return [ImageRef(set=m.set_name, index=m.index, name=m.name) for m in members]


def model_record_of(model: Mapping[str, Any]) -> ModelRecord:
    """The manifest's model record from what the audit recorded (``cdi.audit.model_record``)."""
    model = dict(model)
    known = {"source", "revision", "digest", "weight_sha256", "family", "conditioning", "image_channels",
             "image_size", "num_train_timesteps", "device", "dtype", "noise_schedule", "prediction_type", "sigmas"}
    return ModelRecord(
        source=str(model["source"]), revision=model.get("revision"), digest=model["digest"],
        weight_sha256=dict(model["weight_sha256"]), family=str(model["family"]),
        conditioning=str(model["conditioning"]), image_channels=int(model["image_channels"]),
        image_size=int(model["image_size"]), num_train_timesteps=int(model["num_train_timesteps"]),
        device=str(model["device"]), dtype=str(model["dtype"]),
        noise_schedule=model.get("noise_schedule"), prediction_type=model.get("prediction_type"),
        flow_sigmas=None if model.get("sigmas") is None else {str(k): float(v) for k, v in model["sigmas"].items()},
        details={k: _json_ready(v) for k, v in model.items() if k not in known},
    )


def build_report(result: AuditResult, *, created_at: datetime | None = None) -> Report:
    """The report of an audit (without its integrity block: see :func:`cdi.report.seal`).

    ``created_at`` defaults to now (UTC).
    """
    from cdi.features.layout import FEATURE_NAMES, LAYOUT_VERSION, member_candidates

    test, verdict, options = result.test, result.verdict, result.options
    tested_names = member_candidates(options.tested_columns)[0]
    cal = result.calibrated_test
    return Report(
        schema_version=SCHEMA_VERSION,
        planning=_planning(result.plan),
        sequential=None if result.sequential is None else _sequential_record(result, tested_names),
        verdict=verdict.outcome.value,
        p_value=float(verdict.p_value),
        alpha=float(test.alpha),
        reason=verdict.reason,
        warnings=list(verdict.warnings),
        created_at=created_at or datetime.now(timezone.utc).replace(microsecond=0),
        test=ProtocolRun.of(test, tested_names),
        calibrated_test=None if cal is None else ProtocolRun.of(cal, tested_names),
        decision=Decision(
            rule="cdi-verdict/2", alpha=float(verdict.alpha), alpha_control=float(verdict.alpha_control),
            auc_threshold=float(verdict.auc_threshold),
            test_significant=bool(test.p_value < test.alpha and test.statistic > 0),
            negative_control_failed=bool(verdict.negative_control_failed),
            direction_check_failed=bool(verdict.reversal_failed),
            distribution_shift=bool(verdict.distribution_shift),
            calibrated_significant=None if cal is None else bool(cal.p_value < cal.alpha and cal.statistic > 0),
            shift_failed=bool(verdict.shift_failed),
        ),
        controls=_controls_record(result, tested_names),
        feature_layout=FeatureLayout(version=LAYOUT_VERSION, names=list(FEATURE_NAMES),
                                     used=[FEATURE_NAMES[c] for c in options.tested_columns],
                                     computed=[FEATURE_NAMES[c] for c in options.columns]),
        images=_image_rows(result),
        manifest=_manifest(result),
    )


def _planning(plan: Any) -> Planning | None:
    """The report's record of a ``not_detected`` audit's plan (:class:`cdi.planning.Plan`)."""
    if plan is None:
        return None
    return Planning(
        n_per_set=plan.n_per_set, additional_published=plan.additional_p, interval=list(plan.interval),
        confidence=plan.confidence, power=plan.power, u_ratio=plan.u_ratio, power_now=plan.power_now,
        summary=plan.summary(),
    )


def _image_rows(result: AuditResult) -> list[ImageRow]:
    """One row per tested image: its test row's role, fold and score, its features and descriptors."""
    rows_by: dict[tuple[str, int], Any] = {(r.set_name, r.index): r for r in result.test.rows}
    images: list[ImageRow] = []
    sides: tuple[tuple[SetName, Sequence[Any]], ...] = (("P", result.images_p), ("U", result.images_u))
    for set_name, group in sides:
        for i, im in enumerate(group):
            row = rows_by.get((set_name, i))
            if row is None:
                raise ReportFormatError(f"the test has no row for image {set_name}[{i}] ({im.name})")
            images.append(ImageRow(
                name=im.name, sha256=im.sha256, set=set_name, index=i, role=row.role, fold=row.fold,
                score=None if row.score is None else float(row.score),
                features=[_finite_or_none(v) for v in im.features],
                descriptors=None if im.descriptors is None else [float(v) for v in im.descriptors],
            ))
    return images


def _controls_record(result: AuditResult, tested_names: Sequence[str]) -> Controls:
    """The report's record of every control: negative control, direction, distribution, duplicates, shift."""
    from cdi.reads import DIRECTION_FEATURES

    verdict = result.verdict
    nc = result.negative_control
    control_rows = []
    for r in nc.test.rows:
        positions = nc.half_p if r.set_name == "P" else nc.half_u
        control_rows.append(ControlRow(
            u_index=positions[r.index], plays=r.set_name, role=r.role, fold=r.fold,
            score=None if r.score is None else float(r.score)))
    dist = result.distribution
    significant_shift = dist.p_value < verdict.alpha_control
    dups = result.duplicates
    excl = result.exclusion
    return Controls(
        negative_control=NegativeControl(
            p_value=float(nc.test.p_value), significant=bool(nc.test.p_value < nc.test.alpha),
            split_random_state=int(nc.random_state), half_p=list(nc.half_p), half_u=list(nc.half_u),
            test=ProtocolRun.of(nc.test, tested_names), rows=control_rows,
        ),
        direction_check=DirectionCheck(
            p_value=None if verdict.reversal_p is None else float(verdict.reversal_p),
            failed=bool(verdict.reversal_failed), features=list(DIRECTION_FEATURES),
        ),
        distribution_check=DistributionCheck(
            auc=float(dist.auc), p_value=float(dist.p_value), shift=bool(verdict.distribution_shift),
            warning=bool(significant_shift and not verdict.distribution_shift),
            n_p=dist.n_p, n_u=dist.n_u, n_folds=dist.n_folds, n_permutations=dist.n_permutations,
            random_state=int(dist.random_state), statistic_names=list(dist.statistic_names),
            largest_differences=[StatisticDifference(name=d.name, cohens_d=float(d.cohens_d), auc=float(d.auc))
                                 for d in dist.largest_differences],
        ),
        duplicates=Duplicates(
            difference_threshold=float(dups.difference_threshold),
            candidate_distance=float(dups.candidate_distance),
            pairs=[DuplicatePair(kind=p.kind, scope=p.scope, first=_refs([p.first])[0],
                                 second=_refs([p.second])[0], distance=p.distance,
                                 difference=float(p.difference)) for p in dups.pairs],
            groups=[DuplicateGroup(kind=g.kind, scope=g.scope, members=_refs(g.members)) for g in dups.groups],
        ),
        excluded=Excluded(p=list(excl.p), u=list(excl.u), reasons=list(excl.reasons)),
        shift_control=None if result.shift is None else shift_control_record(result.shift, verdict, tested_names),
    )


def _manifest(result: AuditResult) -> Manifest:
    """What reproduces the audit: the model, the options, the feature key, seeds, versions, passes."""
    options, test, nc, dist = result.options, result.test, result.negative_control, result.distribution
    return Manifest(
        model=model_record_of(result.model),
        options=AuditOptionsRecord(**options.to_dict()),
        feature_key=result.feature_key,
        seeds=Seeds(audit=options.seed, test=test.random_state, negative_control_split=nc.random_state,
                    negative_control_test=nc.test.random_state, distribution_check=dist.random_state),
        versions={str(k): str(v) for k, v in result.versions.items()},
        device=options.device,
        timings_seconds={k: round(float(v), 4) for k, v in result.timings.items()},
        passes=Passes(forward=result.forward_passes, backward=result.backward_passes,
                      cached_images=result.cached_images),
    )


def shift_control_record(shift: Any, verdict: Any, names: Sequence[str] = ()) -> ShiftControl:
    """The report's record of a :class:`cdi.calibration.ShiftCheckResult` and the verdict it fed;
    ``names``: the candidates' names."""
    from cdi.calibration import DESCRIPTOR_NAMES

    return ShiftControl(
        p_value=float(shift.p_value), statistic=float(shift.statistic), alpha_shift=float(shift.alpha_shift),
        ridge=float(shift.ridge), failed=bool(verdict.shift_failed), descriptor_names=list(DESCRIPTOR_NAMES),
        differences=[DescriptorDifference(name=d.name, mean_p=d.mean_p, mean_u=d.mean_u, cohens_d=d.cohens_d,
                                          contribution=d.contribution, words=d.words) for d in shift.differences],
        words=shift.words(), fix=verdict.fix or "",
        candidate=names[shift.candidate] if shift.candidate < len(names) else None,
        class_p=None if shift.class_p is None else float(shift.class_p), class_words=shift.class_words,
        random_state=int(shift.random_state),
    )


def _sequential_record(result: AuditResult, tested_names: Sequence[str]) -> SequentialRecord:
    from cdi.options import FUTILITY_P, MIN_LOOK_SET

    seq = result.sequential
    assert seq is not None
    counts = {"P": len(result.images_p), "U": len(result.images_u)}
    unused = []
    for im in result.unused:
        unused.append(ImageRef(set=im.set_name, index=counts[im.set_name], name=im.name))  # type: ignore[arg-type]
        counts[im.set_name] += 1
    return SequentialRecord(
        spending=seq.design.spending.value,
        planned_looks=seq.design.planned_looks, min_look_set=MIN_LOOK_SET, futility=seq.design.futility,
        futility_p=FUTILITY_P,
        looks=[LookRecord(n_p=r.look.n_p, n_u=r.look.n_u, fraction=r.look.fraction, spent_alpha=r.look.spent,
                          level=r.look.level, test=ProtocolRun.of(r.test, tested_names), crossed=r.crossed,
                          controls_passed=r.controls_passed, futile=r.futile) for r in seq.looks],
        planned=[[lk.n_p, lk.n_u] for lk in seq.design.looks], stop=seq.stop,  # type: ignore[arg-type]
        p_value=float(seq.p_value), submitted_p=counts["P"], submitted_u=counts["U"],
        order_random_state=[int(result.options.seed), 3],
        unused=unused, unused_sha256=[im.sha256 for im in result.unused],
    )


def _json_ready(value: Any) -> Any:
    """Plain JSON data from adapter facts (numbers, strings, lists, dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _json_ready(value.item())
    return str(value)
