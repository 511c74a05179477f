"""One audit, end to end: two image sets and a model in, a verdict out (method §2).

:func:`audit` is a pipeline of steps, each a function of typed inputs that returns a frozen
value (no step reads another's state):

1. :func:`validate_step` → :class:`Validated`: options, set sizes, the models' conditioning,
   every image decoded, captions or labels matched, duplicates found and excluded — all
   before any model weight is loaded (progress stage ``validating``);
2. :func:`load_step` → :class:`Models`: the audited model and the optional reference;
3. :func:`extract_step` → :class:`Features`: features of every image (from the feature store
   when it has them, stored there batch by batch as they are computed, so a killed run
   resumes; stage ``extracting``);
4. :func:`test_step` → :class:`~cdi.stats.ProtocolResult`: the protocol on P against U
   (stage ``scoring``);
5. :func:`controls_step` → :class:`Controls`: the negative control on U's halves, the
   model-free distribution check, the direction check (stage ``testing``);
6. :func:`verdict_step` → :class:`~cdi.verdict.Verdict` (and :func:`plan_step` for a
   ``not_detected`` one);
7. :func:`result_step` → :class:`AuditResult`.

A sequential audit runs steps 3 to 5 look by look (:class:`_Looks`) until a look stops it.
:func:`extract_shard` runs steps 2 and 3 on a part of the images. torch is imported only
when features must be computed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from cdi.controls import (
    DEFAULT_DIFFERENCE_THRESHOLD,
    DistributionCheckResult,
    DuplicateReport,
    Exclusion,
    NegativeControlResult,
    direction_check,
    distribution_check,
    duplicates_to_exclude,
    find_duplicates,
    fingerprint,
    image_statistics,
    negative_control,
)
from cdi.errors import ImageError, InputError
from cdi.features.config import FeatureConfig
from cdi.features.layout import FEATURE_NAMES, LAYOUT_VERSION, FeatureSet, member_candidates
from cdi.images import ImageFile, displayed_size, open_image, to_model_array
from cdi.options import (
    DEFAULT_ALPHA,
    DEFAULT_EXCEEDANCES,
    DEFAULT_FIT_FRACTION,
    DEFAULT_LOOKS,
    DEFAULT_MAX_PERMUTATIONS,
    DEFAULT_N_FOLDS,
    DEFAULT_N_PERMUTATIONS,
    DEFAULT_PROTOCOL,
    DEFAULT_SPENDING,
    ProtocolOptions,
    SequentialOptions,
    check_alpha,
    protocol_of,
)
from cdi.options import Protocol as TestProtocol
from cdi.planning import Plan, plan_audit
from cdi.provenance import versions
from cdi.reads import columns_read, tested_columns
from cdi.runtime import DEFAULT_BATCH_SIZE, DEFAULT_DTYPE, DTYPES
from cdi.sequential import SequentialDesign, SequentialResult, control_options, design, sequential_test
from cdi.stats import ProtocolResult, check_sizes, run_test
from cdi.verdict import Outcome, Verdict, decide

if TYPE_CHECKING:
    from cdi.models.base import DiffusionAdapter

STAGES = ("validating", "extracting", "scoring", "testing")


@dataclass(frozen=True)
class AuditOptions:
    """Everything that changes an audit's result, besides the images and the model."""

    alpha: float = DEFAULT_ALPHA
    protocol: str = DEFAULT_PROTOCOL.value
    #: ``verdict``: the features the verdict reads and nothing else (:mod:`cdi.reads`);
    #: ``all``: the 26; ``gradient-free``: the families that need no gradient.
    features: FeatureSet = FeatureSet.VERDICT
    seed: int = 0
    device: str = "cpu"
    dtype: str = DEFAULT_DTYPE
    #: Images per batch; ``None``: sized from the accelerator's free memory (the default size on the CPU).
    batch_size: int | None = DEFAULT_BATCH_SIZE
    #: The passes' arithmetic: ``fp32`` (the default: the stored features' reference),
    #: ``auto`` (bfloat16 autocast on CUDA, float32 on the CPU), ``bf16`` or ``fp16``.
    precision: str = "fp32"
    fit_fraction: float = DEFAULT_FIT_FRACTION
    n_folds: int = DEFAULT_N_FOLDS
    n_permutations: int = DEFAULT_N_PERMUTATIONS
    max_permutations: int = DEFAULT_MAX_PERMUTATIONS
    exceedances: int = DEFAULT_EXCEEDANCES
    duplicate_threshold: float = DEFAULT_DIFFERENCE_THRESHOLD
    feature_config: FeatureConfig = field(default_factory=FeatureConfig)
    #: A sequential audit (:class:`cdi.options.SequentialOptions`): off by default.
    sequential: bool = False
    looks: int = DEFAULT_LOOKS
    spending: str = DEFAULT_SPENDING.value
    futility: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        protocol_of(self.protocol)
        try:
            object.__setattr__(self, "features", FeatureSet(self.features))
        except ValueError:
            choices = ", ".join(f.value for f in FeatureSet)
            raise InputError(f"unknown feature set {self.features!r}; choose one of: {choices}") from None
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise InputError(f"batch_size must be a positive integer or None (automatic), got {self.batch_size!r}")
        from cdi.features.passes import PRECISIONS

        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.protocol_options  # noqa: B018 - validates the protocol's options
        object.__setattr__(self, "spending", self.sequential_options.spending.value)
        if self.sequential and self.protocol != TestProtocol.DIRECTIONAL.value:
            raise InputError(f"a sequential audit uses the directional protocol, not {self.protocol}")

    @property
    def sequential_options(self) -> SequentialOptions:
        """The sequential design's options (validated; ``enabled`` is :attr:`sequential`)."""
        return SequentialOptions(bool(self.sequential), self.looks, self.spending, bool(self.futility))  # type: ignore[arg-type]

    @property
    def columns(self) -> list[int]:
        """The layout columns the audit extracts (:func:`cdi.reads.columns_read`)."""
        return columns_read(self)

    @property
    def tested_columns(self) -> list[int]:
        """The layout columns its test and negative control see (:func:`cdi.reads.tested_columns`)."""
        return tested_columns(self)

    @property
    def protocol_options(self) -> ProtocolOptions:
        """The test's options; the directional protocol tests the selected loss-type columns."""
        return ProtocolOptions(
            self.fit_fraction, self.n_folds, self.n_permutations,
            exceedances=self.exceedances, max_permutations=self.max_permutations,
            candidates=member_candidates(self.tested_columns)[1],
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = self.features.value
        d["feature_config"] = self.feature_config.to_dict()
        return d


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int


class FeatureStore(Protocol):
    """Where per-image features are kept between runs (the service keeps them in its database).

    ``key`` names everything the features depend on (see :func:`feature_key`).
    """

    def load(self, key: str, sha256s: Sequence[str]) -> dict[str, np.ndarray]: ...

    def save(self, key: str, rows: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class AuditImage:
    """One image of the audit: its name, file hash, set and 26 features (NaN if not computed)."""

    name: str
    sha256: str
    set_name: str
    features: np.ndarray


@dataclass(frozen=True)
class AuditResult:
    verdict: Verdict
    test: ProtocolResult
    negative_control: NegativeControlResult
    distribution: DistributionCheckResult
    duplicates: DuplicateReport
    exclusion: Exclusion
    images_p: tuple[AuditImage, ...]
    images_u: tuple[AuditImage, ...]
    options: AuditOptions
    model: dict[str, Any]
    feature_key: str
    forward_passes: int
    backward_passes: int
    cached_images: int
    timings: dict[str, float]
    versions: dict[str, str]
    #: For a ``not_detected`` verdict: how many images would detect the effect these showed.
    plan: Plan | None = None
    #: The reference model's identity for a reference-calibrated audit (method §10.2).
    reference_model: dict[str, Any] | None = None
    reference_feature_key: str | None = None
    #: A sequential audit's looks; ``images_p`` and ``images_u`` then hold the images used,
    #: ``unused`` those never extracted because it stopped first (in the audit's order).
    sequential: SequentialResult | None = None
    unused: tuple[AuditImage, ...] = ()

    @property
    def calibrated(self) -> bool:
        return self.reference_model is not None

    @property
    def outcome(self) -> str:
        return self.verdict.outcome.value

    @property
    def p_value(self) -> float:
        return self.test.p_value


def feature_key(model_digest: str, options: AuditOptions) -> str:
    """The identity of a set of stored features: model weights, layout, parameters, seed,
    the weights' dtype and the passes' precision.

    Not the feature set: a feature's value does not depend on which others are computed
    (each image's noise comes from the seed and its SHA-256, each family's calls are its
    own), so audits of different feature sets share the rows, each adding what it lacks.
    Nor the batch size, which moves values only by float rounding.
    """
    payload = {
        "model": model_digest,
        "layout": LAYOUT_VERSION,
        "config": options.feature_config.to_dict(),
        "seed": options.seed,
        "dtype": options.dtype,
        "precision": options.precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Prepared:
    files: list[ImageFile]
    set_names: list[str]
    stats: np.ndarray
    conditions: list[Any]


def _conditions(files: Sequence[ImageFile], conditioning: str, captions: Mapping[str, Any] | None,
                labels: Mapping[str, Any] | None) -> list[Any]:
    if conditioning == "class":
        if not labels:
            raise InputError("this model is class-conditional: give a class label for every image")
        missing = [f.name for f in files if f.name not in labels]
        if missing:
            raise InputError(f"no class label for {len(missing)} image(s), e.g. {missing[0]}")
        return [labels[f.name] for f in files]
    if conditioning == "text":
        captions = captions or {}
        return [captions.get(f.name) for f in files]
    if labels:
        raise InputError("labels were given, but this model is not class-conditional")
    return [None] * len(files)


def _validate(
    published: Sequence[ImageFile], unpublished: Sequence[ImageFile], conditioning: str,
    captions: Mapping[str, Any] | None, labels: Mapping[str, Any] | None, options: AuditOptions,
    report: Callable[[str, int, int], None],
) -> tuple[_Prepared, DuplicateReport, Exclusion]:
    files = list(published) + list(unpublished)
    names = [f.name for f in files]
    for group, label in ((published, "published"), (unpublished, "unpublished")):
        seen: set[str] = set()
        for f in group:
            if f.name in seen:
                raise InputError(f"two {label} images are named {f.name}")
            seen.add(f.name)
    if (captions or labels) and len(set(names)) != len(names):
        raise InputError("an image name appears in both sets: captions and labels need unique names")
    conds = _conditions(files, conditioning, captions, labels)
    stats, prints, errors = [], [], []
    for i, f in enumerate(files):
        try:
            img = open_image(f.data, f.name)
        except ImageError as exc:
            errors.append(exc)
            continue
        stats.append(image_statistics(img, len(f.data)))
        prints.append(fingerprint(f.name, f.data, img))
        report("validating", i + 1, len(files))
    if errors:
        raise _unusable(errors)
    n_p = len(published)
    dups = find_duplicates(prints[:n_p], prints[n_p:], options.duplicate_threshold)
    excl = duplicates_to_exclude(dups)
    keep = [i for i in range(n_p) if i not in set(excl.p)] + [
        n_p + j for j in range(len(unpublished)) if j not in set(excl.u)
    ]
    kept_p = sum(1 for i in keep if i < n_p)
    try:
        check_sizes(kept_p, len(keep) - kept_p, options.protocol, options.protocol_options)
    except InputError as exc:
        raise InputError(_exclusion_message(excl, n_p, len(unpublished), exc)) from None
    prepared = _Prepared(
        files=[files[i] for i in keep],
        set_names=["P" if i < n_p else "U" for i in keep],
        stats=np.asarray([stats[i] for i in keep]),
        conditions=[conds[i] for i in keep],
    )
    return prepared, dups, excl


def _unusable(errors: Sequence[ImageError]) -> InputError:
    """One error naming the images that cannot be decoded (the first five, and how many more)."""
    listed = "; ".join(str(e) for e in errors[:5])
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return InputError(f"{len(errors)} image(s) cannot be used: {listed}{more}", image_errors=errors)


def _exclusion_message(excl: Exclusion, n_p: int, n_u: int, exc: InputError) -> str:
    """Why an audit valid as submitted became too small: which images were excluded, and why."""
    return (
        f"{len(excl.p)} published and {len(excl.u)} unpublished image(s) were excluded as duplicates, "
        f"leaving P = {n_p - len(excl.p)} of {n_p} and U = {n_u - len(excl.u)} of {n_u}: {exc}. "
        f"Excluded: {'; '.join(excl.reasons)}. Remove or replace the duplicates, or add images."
    )


def _extract(
    adapter: DiffusionAdapter, prepared: _Prepared, options: AuditOptions, key: str,
    store: FeatureStore | None, report: Callable[[str, int, int], None], rows: Sequence[int] | None = None,
) -> tuple[np.ndarray, int, int, int]:
    """Features ``[n, 26]`` of the prepared images (only ``rows`` of them if given: NaN elsewhere).

    Of each image, the columns the options extract (NaN elsewhere): those the store holds
    are loaded, only the missing ones computed, and each stored row is completed with them.
    Returns the features, the images found complete in the store, and the passes made.
    """
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput

    wanted = range(len(prepared.files)) if rows is None else rows
    columns = options.columns
    all_shas = [f.sha256 for f in prepared.files]
    shas = [all_shas[i] for i in wanted]
    known = store.load(key, sorted(set(shas))) if store is not None else {}
    features = np.full((len(all_shas), len(FEATURE_NAMES)), np.nan)
    stored: dict[str, np.ndarray] = {}  # each image's row as stored (or NaN), to complete
    todo: dict[tuple[int, ...], list[int]] = {}  # missing columns → the first row of each such image
    todo_rows: dict[str, list[int]] = {}
    for i, sha in zip(wanted, shas, strict=True):
        row = np.asarray(known.get(sha, np.full(len(FEATURE_NAMES), np.nan)), dtype=np.float64)
        if row.shape != (len(FEATURE_NAMES),):
            row = np.full(len(FEATURE_NAMES), np.nan)  # a row of another layout: recomputed
        features[i, columns] = row[columns]
        missing = tuple(c for c in columns if np.isnan(row[c]))
        if not missing:
            continue
        if sha not in todo_rows:
            stored[sha] = row.copy()
            todo.setdefault(missing, []).append(i)
            todo_rows[sha] = []
        todo_rows[sha].append(i)

    def load(i: int) -> ExtractionInput:
        # Decoded batch by batch, in the extractor's prefetch thread: never all at once.
        f = prepared.files[i]
        img = open_image(f.data, f.name)
        pixels = to_model_array(img, adapter.image_size, adapter.image_channels)
        return ExtractionInput(f.sha256, pixels, prepared.conditions[i], displayed_size(img))

    cached = len(shas) - sum(len(v) for v in todo_rows.values())
    extractor = FeatureExtractor(
        adapter, columns=columns, config=options.feature_config,
        seed=options.seed, batch_size=options.batch_size, precision=options.precision,
    )
    report("extracting", cached, len(shas))
    done = cached
    for missing, images in todo.items():

        def on_batch(items: Sequence[ExtractionInput], values: np.ndarray, missing: tuple[int, ...] = missing) -> None:
            cols = list(missing)
            complete = {}
            for it, v in zip(items, values, strict=True):
                row = stored[it.sha256]
                row[cols] = v[cols]
                complete[it.sha256] = row
                for r in todo_rows[it.sha256]:
                    features[r, cols] = v[cols]
            if store is not None:
                store.save(key, complete)

        offset = done
        extractor.extract(
            images, progress=lambda d, _total, offset=offset: report("extracting", offset + d, len(shas)),  # type: ignore[misc]
            on_batch=on_batch, load=load, columns=missing,
        )
        done += len(images)
    return features, cached, extractor.passes.forward, extractor.passes.backward


#: What the report says about each mode (method §10.2).
CALIBRATION_NOTES = {
    "uncalibrated": "features of the audited model alone: an image's loss mixes how hard the image is for any "
                    "model with whether this model saw it",
    "reference-calibrated": "every feature is the audited model's minus the reference model's, computed with the "
                            "same per-image noise: the reference (a model that did not see P, usually the base of "
                            "a fine-tune) measures how hard each image is, so the difference isolates what the "
                            "audited model learned; under H0 P and U stay exchangeable, so the test and its "
                            "controls are unchanged",
}


def _load(model: str | DiffusionAdapter, revision: str | None, opts: AuditOptions, lora: str | None,
          lora_scale: float, allow_pickle: bool | None, config: str | None = None,
          components: dict[str, str] | None = None, resolution: int | None = None) -> DiffusionAdapter:
    if not isinstance(model, str):
        if lora is not None:
            raise InputError("a LoRA is applied when a model is loaded: give the model's reference, not an adapter")
        return model
    from cdi.models import load_model

    return load_model(model, revision=revision, device=opts.device, dtype=opts.dtype, allow_pickle=allow_pickle,
                      lora=lora, lora_scale=lora_scale, config=config, components=components,
                      resolution=resolution)


def check_reference(target: DiffusionAdapter, reference: DiffusionAdapter) -> None:
    """Raise :class:`InputError` unless ``reference`` can calibrate ``target``.

    A reference with the audited model's own weights is refused (every difference would be
    zero). The per-image noise is identical only if both models see the same input and draw
    noise of the same shape: same image size, channels, conditioning and z0 shape.
    """
    import torch

    if target.identity.digest == reference.identity.digest:
        raise InputError(
            f"the reference model is the audited model itself (the same weights, identity "
            f"{target.identity.digest[:12]}): calibrating a model by itself leaves nothing to test; give a "
            "different reference, such as the base model of a fine-tune")
    for attr in ("image_size", "image_channels", "conditioning", "num_train_timesteps"):
        a, b = getattr(target, attr), getattr(reference, attr)
        if a != b:
            raise InputError(f"the reference model's {attr.replace('_', ' ')} is {b}, the audited model's {a}: "
                             "a reference must take the same inputs")
    probe = torch.zeros(1, target.image_channels, target.image_size, target.image_size)
    with torch.inference_mode():
        shapes = tuple(target.encode(probe).shape), tuple(reference.encode(probe).shape)
    if shapes[0] != shapes[1]:
        raise InputError(f"the reference model's latents are {shapes[1][1:]}, the audited model's {shapes[0][1:]}: "
                         "the same per-image noise needs the same latent shape")


def portable_source(reference: Any) -> str:
    """How a report names a model's source: a shipped model by its name (the same on every
    host), a hub id as it is, a directory as given."""
    source = str(reference.source)
    if getattr(reference, "is_local", False):
        from pathlib import Path

        try:
            from cdi import zoo
        except ImportError:  # pragma: no cover - the zoo is part of the package
            return source
        path = Path(source).resolve()
        for root in (zoo.MODELS_DIR, zoo.LORAS_DIR):
            if path.parent == Path(root).resolve() and (path / "manifest.json").is_file():
                return path.name
    return source


def _portable_lora(source: str, name: str | None) -> str:
    """How a report names a LoRA's files: a shipped LoRA by its name; under ``name`` (a
    registered model) by the file's name only; else as given."""
    from pathlib import Path

    path = Path(source)
    try:
        from cdi import zoo

        rel = path.resolve().relative_to(Path(zoo.LORAS_DIR).resolve())
        return rel.parts[0]
    except (ImportError, ValueError, IndexError):
        pass
    return f"{name}: {path.name}" if name else source


def model_record(adapter: DiffusionAdapter, opts: AuditOptions, name: str | None = None) -> dict[str, Any]:
    """What a report records of a model: its name (``name``, e.g. a service's registered id,
    else :func:`portable_source`), weight hashes (and a LoRA's), facts."""
    facts = adapter.describe(opts.feature_config.timesteps())
    lora = facts.get("lora")
    if isinstance(lora, dict) and isinstance(lora.get("source"), str):
        facts["lora"] = {**lora, "source": _portable_lora(lora["source"], name)}
    return {
        "source": name or portable_source(adapter.identity.reference),
        "revision": adapter.identity.reference.revision,
        "digest": adapter.identity.digest,
        "weight_sha256": dict(adapter.identity.weight_sha256),
        **facts,
    }


# --- the pipeline: validate → load → extract → test → controls → verdict → result --------------
# A study that has feature matrices already runs test → controls → verdict alone.


@dataclass(frozen=True)
class ModelSpec:
    """A model to audit (or to calibrate with): a reference to load or an already loaded adapter.

    ``model``: a model directory, hub id or shipped model name, or an adapter; ``config``: the
    diffusers configs of a single-file checkpoint; ``lora`` (and its ``lora_scale``) is loaded
    onto it; ``name`` names it in the report; ``components`` takes its UNet or transformer from
    one file (``{"unet": FILE}``); ``resolution`` audits a Flux model at that image side.
    """

    model: str | DiffusionAdapter
    revision: str | None = None
    config: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    name: str | None = None
    components: dict[str, str] | None = None
    resolution: int | None = None

    def conditioning(self) -> str:
        """``"class"``, ``"text"`` or ``"none"``, read from the model's configs (no weight is loaded)."""
        if not isinstance(self.model, str):
            return str(self.model.conditioning)
        from cdi.models.detect import detect_family

        return detect_family(self.model, self.revision, self.config, self.components).conditioning


@dataclass(frozen=True)
class Validated:
    """The validate step's output: the images to extract (in the audit's order), the duplicates."""

    prepared: _Prepared
    duplicates: DuplicateReport
    exclusion: Exclusion


@dataclass(frozen=True)
class Models:
    """The load step's output: the audited model and the optional reference, with their feature keys."""

    adapter: DiffusionAdapter
    key: str
    reference: DiffusionAdapter | None = None
    reference_key: str | None = None

    @property
    def passes(self) -> int:
        """How many times each image goes through a model: twice with a reference."""
        return 1 if self.reference is None else 2


@dataclass(frozen=True)
class Features:
    """The extract step's output: features ``[n, 26]`` (NaN where not extracted) and their cost.

    For a reference-calibrated audit, the audited model's features minus the reference's.
    """

    values: np.ndarray
    cached: int = 0
    forward: int = 0
    backward: int = 0

    def updated(self, new: Features, rows: Sequence[int]) -> Features:
        """These features with ``rows`` taken from ``new``, the costs added up."""
        values = self.values.copy()
        values[list(rows)] = new.values[list(rows)]
        return Features(values, self.cached + new.cached, self.forward + new.forward, self.backward + new.backward)


@dataclass(frozen=True)
class Controls:
    """The controls step's output: the negative control, the distribution and direction checks."""

    negative_control: NegativeControlResult
    distribution: DistributionCheckResult
    reversal_p: float


@dataclass(frozen=True)
class Tested:
    """What the test, controls and verdict steps concluded, on the first ``n_p`` + ``n_u`` images."""

    features: Features
    n_p: int
    n_u: int
    test: ProtocolResult
    controls: Controls
    verdict: Verdict
    sequential: SequentialResult | None = None


ProgressFn = Callable[[str, int, int], None]


def _reporter(progress: Callable[[Progress], None] | None) -> ProgressFn:
    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(Progress(stage, done, total))

    return report


_T = TypeVar("_T")


def _timed(step: Callable[[], _T]) -> tuple[_T, float]:
    start = time.perf_counter()
    out = step()
    return out, time.perf_counter() - start


def validate_step(
    published: Sequence[ImageFile], unpublished: Sequence[ImageFile], target: ModelSpec,
    reference: ModelSpec | None, captions: Mapping[str, Any] | None, labels: Mapping[str, Any] | None,
    options: AuditOptions, report: ProgressFn,
) -> Validated:
    """Check everything about the input before any weight is loaded: set sizes, the models'
    conditioning, names, captions or labels, every image decoded; find the duplicates."""
    # Sizes first: a too-small audit fails before any model file is even read.
    check_sizes(len(published), len(unpublished), options.protocol, options.protocol_options)
    conditioning = target.conditioning()
    if reference is not None:
        ref_conditioning = reference.conditioning()
        if ref_conditioning != conditioning:
            raise InputError(f"the reference model's conditioning is {ref_conditioning}, the audited model's "
                             f"{conditioning}: a reference must take the same inputs")
    prepared, dups, excl = _validate(published, unpublished, conditioning, captions, labels, options, report)
    if options.sequential:
        prepared = _round_order(prepared, options.seed)
    return Validated(prepared, dups, excl)


def load_step(target: ModelSpec, reference: ModelSpec | None, options: AuditOptions,
              allow_pickle: bool | None) -> Models:
    """Load the audited model (and the reference, checked to calibrate it)."""
    adapter = _load(target.model, target.revision, options, target.lora, target.lora_scale, allow_pickle,
                    target.config, target.components, target.resolution)
    if reference is None:
        return Models(adapter, feature_key(adapter.identity.digest, options))
    ref = _load(reference.model, reference.revision, options, None, 1.0, allow_pickle, reference.config,
                reference.components, reference.resolution)
    check_reference(adapter, ref)
    return Models(adapter, feature_key(adapter.identity.digest, options), ref,
                  feature_key(ref.identity.digest, options))


def extract_step(models: Models, prepared: _Prepared, options: AuditOptions, store: FeatureStore | None,
                 rows: Sequence[int], report: ProgressFn, done: int = 0) -> Features:
    """The features of ``rows`` (indices into ``prepared``; NaN elsewhere), from ``store``
    where it has them. Progress counts ``done`` images already extracted before these."""
    total = models.passes * len(prepared.files)

    def stage(offset: int) -> ProgressFn:
        return lambda name, n, _total: report(name, offset + n, total)

    raw, cached, fwd, bwd = _extract(models.adapter, prepared, options, models.key, store, stage(done), rows)
    if models.reference is not None:
        # Each model's raw features are stored under its own key; only their difference is
        # tested. The same seed and image hashes give the same per-image noise (§10.2).
        assert models.reference_key is not None
        ref_raw, ref_cached, ref_fwd, ref_bwd = _extract(
            models.reference, prepared, options, models.reference_key, store, stage(done + len(rows)), rows)
        raw = raw - ref_raw
        cached, fwd, bwd = cached + ref_cached, fwd + ref_fwd, bwd + ref_bwd
    return Features(raw, cached, fwd, bwd)


def test_step(xp: np.ndarray, xu: np.ndarray, options: AuditOptions) -> ProtocolResult:
    """The audit's test of P ``[n_p, f]`` against U ``[n_u, f]`` (the tested columns only)."""
    return run_test(xp, xu, options.protocol, options.protocol_options, alpha=options.alpha,
                    random_state=options.seed)


def controls_step(features_p: np.ndarray, features_u: np.ndarray, stats_p: np.ndarray, stats_u: np.ndarray,
                  options: AuditOptions, protocol_options: ProtocolOptions) -> Controls:
    """The negative control (U's halves, ``protocol_options``), the model-free distribution
    check (image statistics ``stats_*``) and the direction check, on full feature rows ``[n, 26]``."""
    control = negative_control(features_u[:, options.tested_columns], options.protocol, protocol_options,
                               alpha=options.alpha, random_state=options.seed + 1)
    dist = distribution_check(stats_p, stats_u, random_state=options.seed + 2)
    return Controls(control, dist, direction_check(features_p, features_u))


def verdict_step(test: ProtocolResult, controls: Controls) -> Verdict:
    """The verdict from the test and its controls (:func:`cdi.verdict.decide`)."""
    return decide(test, controls.negative_control, controls.distribution, reversal_p=controls.reversal_p)


def _set_rows(prepared: _Prepared) -> tuple[np.ndarray, np.ndarray]:
    is_p = np.array([s == "P" for s in prepared.set_names], dtype=bool)
    return np.flatnonzero(is_p), np.flatnonzero(~is_p)


def _fixed(models: Models, prepared: _Prepared, options: AuditOptions, store: FeatureStore | None,
           report: ProgressFn) -> tuple[Tested, dict[str, float]]:
    """Extract every image, then test, control and decide once."""
    p_rows, u_rows = _set_rows(prepared)
    cols = options.tested_columns
    features, extracting = _timed(
        lambda: extract_step(models, prepared, options, store, range(len(prepared.files)), report))
    report("scoring", 0, 1)
    x = features.values
    test, scoring = _timed(lambda: test_step(x[p_rows][:, cols], x[u_rows][:, cols], options))
    report("scoring", 1, 1)
    report("testing", 0, 1)
    controls, testing = _timed(lambda: controls_step(x[p_rows], x[u_rows], prepared.stats[p_rows],
                                                     prepared.stats[u_rows], options, options.protocol_options))
    verdict = verdict_step(test, controls)
    report("testing", 1, 1)
    tested = Tested(features, len(p_rows), len(u_rows), test, controls, verdict)
    return tested, {"extracting": extracting, "scoring": scoring, "testing": testing}


class _Looks:
    """A sequential audit's look callbacks (:func:`cdi.sequential.sequential_test`): each look
    extracts the images it adds; a crossing look runs its controls on the images it tested.

    Its state (the features so far, the checked looks, the extraction time) is this step's own.
    """

    def __init__(self, models: Models, prepared: _Prepared, options: AuditOptions, store: FeatureStore | None,
                 report: ProgressFn, design_: SequentialDesign) -> None:
        self.models, self.prepared, self.options, self.store, self.report = models, prepared, options, store, report
        self.design = design_
        self.p_rows, self.u_rows = _set_rows(prepared)
        self.look_options = control_options(options.protocol_options)
        self.features = Features(np.full((len(prepared.files), len(FEATURE_NAMES)), np.nan))
        self.checked: dict[int, tuple[Controls, Verdict]] = {}
        self.extracting = 0.0

    def features_for(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        look, cols = self.design.looks[k], self.options.tested_columns
        wanted = np.r_[self.p_rows[: look.n_p], self.u_rows[: look.n_u]].tolist()
        rows = [i for i in wanted if np.isnan(self.features.values[i]).all()]
        if rows:
            done = self.models.passes * int((~np.isnan(self.features.values).all(axis=1)).sum())
            new, seconds = _timed(lambda: extract_step(self.models, self.prepared, self.options, self.store, rows,
                                                       self.report, done))
            self.features, self.extracting = self.features.updated(new, rows), self.extracting + seconds
        self.report("scoring", k, len(self.design.looks))
        x = self.features.values
        return x[self.p_rows[: look.n_p]][:, cols], x[self.u_rows[: look.n_u]][:, cols]

    def controls_of(self, n_p: int, n_u: int, test: ProtocolResult) -> tuple[Controls, Verdict]:
        p, u, x = self.p_rows[:n_p], self.u_rows[:n_u], self.features.values
        controls = controls_step(x[p], x[u], self.prepared.stats[p], self.prepared.stats[u], self.options,
                                 self.look_options)
        return controls, verdict_step(test, controls)

    def passes(self, k: int, test: ProtocolResult) -> bool:
        # Only a crossing look runs them: a detection must survive its controls on the very
        # images it rests on, or the audit goes on to the next round.
        look = self.design.looks[k]
        self.checked[k] = self.controls_of(look.n_p, look.n_u, test)
        return self.checked[k][1].outcome is not Outcome.INCONCLUSIVE


def _sequential(models: Models, prepared: _Prepared, options: AuditOptions, store: FeatureStore | None,
                report: ProgressFn) -> tuple[Tested, dict[str, float]]:
    """Look after look, extract the next images and test, until a look stops the audit; then
    the controls and the verdict of the stopping look, on the images it tested."""
    p_rows, u_rows = _set_rows(prepared)
    design_ = design(len(p_rows), len(u_rows), options.sequential_options, options.alpha,
                     floor=1.0 / (1 + options.max_permutations))
    looks = _Looks(models, prepared, options, store, report, design_)
    empty = np.empty((0, len(options.tested_columns)))
    seq, seconds = _timed(lambda: sequential_test(empty, empty, design_, options.protocol_options,
                                                  random_state=options.seed, controls=looks.passes,
                                                  features_for=looks.features_for))
    report("scoring", len(design_.looks), len(design_.looks))
    report("testing", 0, 1)
    last = len(seq.looks) - 1
    (controls, verdict), testing = _timed(
        lambda: looks.checked[last] if last in looks.checked else looks.controls_of(seq.n_p, seq.n_u, seq.test))
    verdict = replace(verdict, reason=f"{verdict.reason} {_sequential_sentence(seq)}")
    report("testing", 1, 1)
    tested = Tested(looks.features, seq.n_p, seq.n_u, seq.test, controls, verdict, seq)
    return tested, {"extracting": looks.extracting, "scoring": seconds - looks.extracting, "testing": testing}


def plan_step(tested: Tested, prepared: _Prepared, options: AuditOptions) -> Plan | None:
    """For a ``not_detected`` verdict: how many images would detect the effect these showed."""
    if tested.verdict.outcome is not Outcome.NOT_DETECTED:
        return None
    p_rows, u_rows = _set_rows(prepared)
    cols, x = options.tested_columns, tested.features.values
    return plan_audit(x[p_rows[: tested.n_p]][:, cols], x[u_rows[: tested.n_u]][:, cols], cols,
                      alpha=options.alpha, bootstraps=100, random_state=options.seed)


def result_step(validated: Validated, models: Models, tested: Tested, plan: Plan | None, options: AuditOptions,
                timings: dict[str, float], target: ModelSpec, reference: ModelSpec | None) -> AuditResult:
    """The audit's result: the images used (and those a sequential audit never needed), the
    models' records, the verdict and everything it rests on."""
    prepared = validated.prepared
    p_rows, u_rows = _set_rows(prepared)
    used = set(p_rows[: tested.n_p].tolist()) | set(u_rows[: tested.n_u].tolist())
    images = [AuditImage(f.name, f.sha256, s, tested.features.values[i])
              for i, (f, s) in enumerate(zip(prepared.files, prepared.set_names, strict=True))]
    ref_record = None
    if models.reference is not None:
        assert reference is not None
        ref_record = {**model_record(models.reference, options, reference.name), "feature_key": models.reference_key}
    mode = "uncalibrated" if ref_record is None else "reference-calibrated"
    model_info = model_record(models.adapter, options, target.name)
    model_info["calibration"] = {"mode": mode, "why": CALIBRATION_NOTES[mode],
                                 **({"reference_model": ref_record} if ref_record is not None else {})}
    return AuditResult(
        verdict=tested.verdict, test=tested.test, negative_control=tested.controls.negative_control,
        distribution=tested.controls.distribution, duplicates=validated.duplicates, exclusion=validated.exclusion,
        images_p=tuple(im for i, im in enumerate(images) if i in used and im.set_name == "P"),
        images_u=tuple(im for i, im in enumerate(images) if i in used and im.set_name == "U"),
        options=options, model=model_info, feature_key=models.key, forward_passes=tested.features.forward,
        backward_passes=tested.features.backward, cached_images=tested.features.cached, timings=timings,
        versions=versions(), plan=plan, reference_model=ref_record, reference_feature_key=models.reference_key,
        sequential=tested.sequential, unused=tuple(im for i, im in enumerate(images) if i not in used),
    )


def audit(
    published: Sequence[ImageFile],
    unpublished: Sequence[ImageFile],
    model: str | DiffusionAdapter,
    *,
    revision: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    reference_model: str | DiffusionAdapter | None = None,
    reference_revision: str | None = None,
    allow_pickle: bool | None = None,
    config: str | None = None,
    reference_config: str | None = None,
    components: dict[str, str] | None = None,
    resolution: int | None = None,
    captions: Mapping[str, str] | None = None,
    labels: Mapping[str, int] | None = None,
    options: AuditOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
    feature_store: FeatureStore | None = None,
    model_name: str | None = None,
    reference_name: str | None = None,
) -> AuditResult:
    """Run CDI on published images P and unpublished images U against ``model``.

    ``model`` is a model directory, hub id or shipped model name (loaded after validation)
    or an already loaded adapter; ``lora`` (a file, folder or shipped LoRA) is loaded onto
    it at ``lora_scale``. With ``reference_model`` (any model reference, usually the base of
    a fine-tune, or an adapter) the audit is reference-calibrated (method §10.2): features
    are computed under both models with the same per-image noise, and the scorer, the test
    and the controls see the differences. Pickled weights are refused unless
    ``allow_pickle`` (default: ``CDI_ALLOW_PICKLE=1``). A model (or reference) given as one
    single-file checkpoint needs ``config`` (``reference_config``): a local diffusers folder
    of its configs. ``components`` takes the model's UNet or transformer from one file beside
    the base (``{"unet": FILE}``); ``resolution`` audits a Flux model (and its reference) at
    that image side. ``model_name`` and ``reference_name`` name the models in the report (a
    service's registered ids; default: the shipped model's name, the hub id or the
    directory). Raises
    :class:`~cdi.errors.InputError` for invalid input, before any weight is loaded.
    """
    opts = options or AuditOptions()
    report = _reporter(progress)
    target = ModelSpec(model, revision, config, lora, lora_scale, model_name, components, resolution)
    reference = None if reference_model is None else ModelSpec(
        reference_model, reference_revision, reference_config, name=reference_name, resolution=resolution)
    timings: dict[str, float] = {}
    validated, timings["validating"] = _timed(
        lambda: validate_step(published, unpublished, target, reference, captions, labels, opts, report))
    models, timings["loading"] = _timed(lambda: load_step(target, reference, opts, allow_pickle))
    run = _sequential if opts.sequential else _fixed
    tested, laps = run(models, validated.prepared, opts, feature_store, report)
    timings.update(laps)
    plan, planning = _timed(lambda: plan_step(tested, validated.prepared, opts))
    timings["testing"] += planning
    return result_step(validated, models, tested, plan, opts, timings, target, reference)


def _sequential_sentence(seq: SequentialResult) -> str:
    """What a sequential audit's verdict adds: the looks, the boundary, the images used."""
    last = seq.looks[-1]
    k, planned = len(seq.looks), len(seq.design.looks)
    where = (f"Sequential audit ({seq.design.spending.value} spending, {planned} looks): look {k} tested "
             f"{last.look.n_p} + {last.look.n_u} images (p = {last.test.p_value:.3g}, boundary {last.look.level:.3g})")
    if seq.stop == "boundary":
        return where + "; it crossed its boundary and its controls passed, so the audit stopped there."
    if seq.stop == "futility":
        return where + "; P did not lean towards used, so the audit stopped for futility."
    return where + "; no look stopped the audit early."


def _round_order(prepared: _Prepared, seed: int) -> _Prepared:
    """``prepared`` with P's and U's images each in a random order (P first, then U).

    A sequential audit's look k tests the first images of each set; a seeded random order
    makes every round a random subset of its set, whatever order the images came in.
    """
    rng = np.random.default_rng([seed, 3])
    is_p = np.array([s == "P" for s in prepared.set_names])
    order = np.r_[rng.permutation(np.flatnonzero(is_p)), rng.permutation(np.flatnonzero(~is_p))]
    return _Prepared(
        files=[prepared.files[i] for i in order],
        set_names=[prepared.set_names[i] for i in order],
        stats=prepared.stats[order],
        conditions=[prepared.conditions[i] for i in order],
    )


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_shard` did: images, how many found stored, passes, the feature key."""

    images: int
    cached: int
    computed: int
    forward_passes: int
    backward_passes: int
    feature_key: str
    reference_feature_key: str | None = None


def extract_shard(
    files: Sequence[ImageFile],
    model: str | DiffusionAdapter,
    feature_store: FeatureStore,
    *,
    revision: str | None = None,
    reference_model: str | DiffusionAdapter | None = None,
    reference_revision: str | None = None,
    allow_pickle: bool | None = None,
    captions: Mapping[str, str] | None = None,
    labels: Mapping[str, int] | None = None,
    options: AuditOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> Extraction:
    """Compute into ``feature_store`` the features of some of an audit's images (one shard).

    The features are those :func:`audit` computes for the same images, model, reference and
    options (an image's noise depends on the seed and its SHA-256 only, never on its batch or
    its neighbours; other batches only round differently, at float precision), so an
    :func:`audit` over all the images with the same store afterwards computes nothing again.
    Images whose features the store has are skipped. Every image is
    decoded first: unreadable ones raise one :class:`~cdi.errors.InputError` naming them.
    """
    opts = options or AuditOptions()
    report = _reporter(progress)
    target = ModelSpec(model, revision)
    conds = _conditions(files, target.conditioning(), captions, labels)
    errors: list[ImageError] = []
    for i, f in enumerate(files):
        try:
            open_image(f.data, f.name)
        except ImageError as exc:
            errors.append(exc)
        report("validating", i + 1, len(files))
    if errors:
        raise _unusable(errors)
    prepared = _Prepared(files=list(files), set_names=[""] * len(files), stats=np.empty((0,)), conditions=conds)
    reference = None if reference_model is None else ModelSpec(reference_model, reference_revision)
    models = load_step(target, reference, opts, allow_pickle)
    n = len(files)
    done = extract_step(models, prepared, opts, feature_store, range(n), report)
    return Extraction(images=n, cached=done.cached, computed=models.passes * n - done.cached,
                      forward_passes=done.forward, backward_passes=done.backward, feature_key=models.key,
                      reference_feature_key=models.reference_key)
