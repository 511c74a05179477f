"""The library's public functions, re-exported by :mod:`cdi` (``cdi.run_audit(...)``).

A complete audit::

    import cdi

    result = cdi.run_audit("digits-memorised", "demo/published", "demo/unpublished", seed=0)
    print(result.outcome, result.p_value)        # e.g. "used 0.001"
    cdi.save_report(result, "report.json", pdf="report.pdf")
    assert cdi.verify("report.json").ok and cdi.recompute("report.json").ok

Images are given as a folder, or as a sequence of file paths or :class:`~cdi.images.ImageFile`;
captions and labels as a CSV/JSON Lines file (``file,caption`` / ``file,label``) or a mapping
from image file name to caption or class. Errors in the input raise
:class:`~cdi.errors.InputError` before any weight is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdi.errors import InputError
from cdi.runtime import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from cdi.audit import AuditResult, Progress
    from cdi.features.extractor import ExtractionResult
    from cdi.images import ImageFile
    from cdi.models.base import DiffusionAdapter
    from cdi.report.integrity import Verification
    from cdi.report.model import Report
    from cdi.report.recompute import Recomputation

    PathLike = str | Path
    #: A folder, or image files (paths or :class:`~cdi.images.ImageFile`).
    Images = PathLike | Sequence[PathLike | ImageFile]
    #: A CSV / JSON Lines file, or a mapping from image file name to caption or class.
    Conditions = PathLike | Mapping[str, Any] | None

__all__ = ["extract_features", "load_model", "recompute", "run_audit", "save_report", "verify"]



def _images(images: Images, what: str) -> list[ImageFile]:
    from cdi.images import ImageFile, list_image_files

    if isinstance(images, str | Path):
        folder = Path(images)
        if not folder.is_dir():
            raise InputError(f"the {what} images: {folder} is not a folder")
        paths = list_image_files(folder)
        if not paths:
            raise InputError(f"the {what} images: no image files in {folder}")
        return [ImageFile.read(p) for p in paths]
    return [f if isinstance(f, ImageFile) else ImageFile.read(f) for f in images]


def _conditions(value: Conditions, kind: str) -> dict[str, Any] | None:
    from cdi.conditions import read_conditions

    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    return dict(read_conditions(value, kind))  # type: ignore[arg-type]


def load_model(model: str, revision: str | None = None, device: str = "cpu",
               dtype: str = "float32", config: str | None = None, *, unet: str | None = None,
               transformer: str | None = None, resolution: int | None = None) -> DiffusionAdapter:
    """A model directory (diffusers layout), hub id or shipped model name, loaded as its family's adapter.

    A single-file checkpoint (``.safetensors``) loads with ``config``, a local diffusers folder
    of its architecture's configs. ``unet`` (SD 1.x/2.x, SDXL) or ``transformer`` (SD3, Flux): a
    fine-tune published as that component alone, with ``model``'s other components.
    ``resolution``: the image side to audit a Flux model at.
    """
    from cdi.models import load_model as _load

    return _load(model, revision=revision, device=device, dtype=dtype, config=config,
                 components=_component_files(unet, transformer), resolution=resolution)


def _component_files(unet: str | None, transformer: str | None) -> dict[str, str] | None:
    files = {"unet": unet, "transformer": transformer}
    return {role: f for role, f in files.items() if f is not None} or None


def run_audit(
    model: str | DiffusionAdapter,
    published: Images,
    unpublished: Images,
    *,
    captions: Conditions = None,
    labels: Conditions = None,
    revision: str | None = None,
    config: str | None = None,
    unet: str | None = None,
    transformer: str | None = None,
    resolution: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    cache: bool | str | os.PathLike[str] = True,
    **options: Any,
) -> AuditResult:
    """Test whether ``model`` was trained on the ``published`` images (P) rather than the ``unpublished`` (U).

    ``options`` are :class:`cdi.audit.AuditOptions` fields (``alpha``, ``protocol``,
    ``features``, ``seed``, ``device``, ``dtype``, ``batch_size``…), with its defaults.
    Returns the :class:`~cdi.audit.AuditResult`: ``outcome`` (``used``, ``not_detected``,
    ``inconclusive``), ``p_value``, ``verdict.reason``, the test and the controls.
    ``config``: a single-file checkpoint's local folder of configs; ``unet``, ``transformer``,
    ``resolution``: see :func:`load_model`.
    ``progress``: called at every step; by default, when stderr is a terminal, a progress bar
    per stage is drawn there (as ``cdi audit`` does), and nothing otherwise.
    ``cache``: the local feature cache (:mod:`cdi.cache`; ``True``: the user's cache folder, a
    path: that folder, ``False``: none), so that a repeat audit of the same images computes
    no feature.
    """
    from cdi.audit import AuditOptions
    from cdi.audit import audit as _audit
    from cdi.cache import LocalFeatureStore

    if progress is None and sys.stderr is not None and sys.stderr.isatty():
        from cdi.cli import AuditProgress

        progress = AuditProgress()
    store = None if cache is False else LocalFeatureStore(None if cache is True else cache)
    return _audit(
        _images(published, "published"), _images(unpublished, "unpublished"), model, revision=revision,
        config=config, components=_component_files(unet, transformer), resolution=resolution,
        captions=_conditions(captions, "caption"), labels=_conditions(labels, "label"),
        options=AuditOptions(**options), progress=progress, feature_store=store,
    )


def extract_features(
    model: str | DiffusionAdapter,
    images: Images,
    *,
    captions: Conditions = None,
    labels: Conditions = None,
    seed: int = 0,
    feature_set: str = "all",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
) -> ExtractionResult:
    """The 26 CDI features of each image: ``rows`` (name, SHA-256, ``values`` ``[26]``) and ``failures``.

    Column names: :data:`cdi.features.FEATURE_NAMES`. An image's features depend only on the
    image, the model, ``seed`` and ``feature_set``, never on its batch or its neighbours.
    """
    from cdi.features import FeatureExtractor

    files = _images(images, "given")
    adapter = load_model(model, device=device) if isinstance(model, str) else model
    mapping = _conditions(captions, "caption") or _conditions(labels, "label")
    conditions = [mapping.get(f.name) for f in files] if mapping is not None else None
    extractor = FeatureExtractor(adapter, feature_set=feature_set, seed=seed, batch_size=batch_size)
    return extractor.extract_files(files, conditions)


def save_report(result: AuditResult, path: PathLike, *, pdf: PathLike | None = None,
                signing_key: Any = None) -> Report:
    """Write the sealed JSON report of ``result`` to ``path`` (and its PDF to ``pdf``); returns the report.

    ``signing_key``: an Ed25519 private key (or a PEM file's path) to sign the report with.
    """
    from cdi.report import build_report, load_private_key, render_pdf, report_json, seal

    if isinstance(signing_key, str | Path):
        signing_key = load_private_key(signing_key)
    report = seal(build_report(result), signing_key)
    Path(path).write_text(report_json(report), encoding="utf-8")
    if pdf is not None:
        Path(pdf).write_bytes(render_pdf(report))
    return report


def _document(report: PathLike | Mapping[str, Any]) -> Any:
    from cdi.report import read_document

    return dict(report) if isinstance(report, Mapping) else read_document(report)


def verify(report: PathLike | Mapping[str, Any], public_key: Any = None) -> Verification:
    """Check a report's digest, schema and signature (against ``public_key``, a key or PEM path, if given).

    ``.ok`` is true when everything checked holds; ``.problems`` says what does not.
    """
    from cdi.report import load_public_key, verify_document

    if isinstance(public_key, str | Path):
        public_key = load_public_key(public_key)
    return verify_document(_document(report), public_key)


def recompute(report: PathLike | Mapping[str, Any]) -> Recomputation:
    """Rerun the report's test, controls and verdict from the report alone; ``.ok`` if all reproduce."""
    from cdi.report import parse_report, recompute_report

    return recompute_report(parse_report(_document(report)))
