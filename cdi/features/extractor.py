"""The extractor: runs a chosen feature set over batches of images, sharing work.

Each image is encoded once per batch; each distinct network call is evaluated once
(:class:`~cdi.features.scheduler.CallScheduler`); every random draw comes from the image's own
generator (seed, SHA-256), so an image's features do not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdi.errors import ImageError, InputError
from cdi.features.config import FeatureConfig
from cdi.features.context import Batch, FamilyRun, NoiseDraws, PassCounter
from cdi.features.gradient_masking import gradient_masking
from cdi.features.layout import FAMILY_COLUMNS, FEATURE_NAMES, FeatureSet
from cdi.features.loss import denoising_loss, multiple_loss
from cdi.features.noise_optimisation import noise_optimisation, noise_optimisation_depth
from cdi.features.pia import pia, pian
from cdi.features.scheduler import CallScheduler
from cdi.features.secmi import secmi_depth, secmi_stat
from cdi.images import ImageFile, displayed_size, open_image, to_model_array
from cdi.models.base import DiffusionAdapter, ImageCondition


@dataclass(frozen=True)
class Family:
    """A feature family: its generator, and its depth (the call lists it yields in turn)."""

    run: Callable[[Batch], FamilyRun]
    depth: Callable[[FeatureConfig], int]


def _levels(n: int) -> Callable[[FeatureConfig], int]:
    return lambda config: n


#: The families; the scheduler runs them side by side, sharing and fusing their calls.
FAMILIES: dict[str, Family] = {
    "dl": Family(denoising_loss, _levels(1)),
    "secmi": Family(secmi_stat, secmi_depth),
    "pia": Family(pia, _levels(2)),
    "pian": Family(pian, _levels(2)),
    "gm": Family(gradient_masking, _levels(2)),
    "ml": Family(multiple_loss, _levels(1)),
    "no": Family(noise_optimisation, noise_optimisation_depth),
}


@dataclass(frozen=True)
class ExtractionInput:
    """One preprocessed image: ``pixels`` float32 ``[C, H, W]`` in [-1, 1]."""

    sha256: str
    pixels: np.ndarray
    condition: ImageCondition = None
    #: (height, width) of the image before preprocessing, for models conditioned on it (SDXL).
    original_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class FeatureRow:
    """One image's 26 features in layout order (NaN where the set computes none)."""

    name: str
    sha256: str
    values: np.ndarray


@dataclass(frozen=True)
class ExtractionResult:
    rows: list[FeatureRow]
    failures: list[ImageError]
    passes: PassCounter


class FeatureExtractor:
    """Computes CDI features for batches of images with one model.

    Parameters are stored as given; ``share_work=False`` runs each family on its own, with
    its own encoding and passes, as the reference code does (the benchmark's baseline).
    """

    def __init__(
        self,
        adapter: DiffusionAdapter,
        *,
        feature_set: FeatureSet | str = FeatureSet.ALL,
        config: FeatureConfig | None = None,
        seed: int = 0,
        batch_size: int = 32,
        share_work: bool = True,
        max_fused: int | None = None,
    ) -> None:
        self.adapter = adapter
        self.feature_set = FeatureSet(feature_set)
        self.config = config or FeatureConfig()
        self.seed = int(seed)
        if batch_size < 1:
            raise InputError("batch_size must be at least 1")
        self.batch_size = int(batch_size)
        self.share_work = share_work
        #: Most samples in one fused network call. Past a few batches a call gets no faster
        #: per sample (measured on CPU) and only needs more memory: default 4 batches.
        self.max_fused = int(max_fused or 4 * self.batch_size)
        self.passes = PassCounter()
        self.config.validate_for(adapter.num_train_timesteps)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # One image per call: an image's z0 is then the same bits in every batch, which the
        # isolated gradient passes of GM need (see Call.isolated).
        with torch.inference_mode():
            z0 = torch.cat([self.adapter.encode(p[None]).float() for p in pixels])
        return z0.clone()

    def _condition(self, items: Sequence[ExtractionInput]) -> torch.Tensor | None:
        """The batch's conditioning, image by image for the same reason as :meth:`_encode`."""
        parts = [self.adapter.condition([it.condition], [it.original_size]) for it in items]
        if any(p is None for p in parts):
            return None
        return torch.cat([p for p in parts if p is not None])

    def _batch(self, items: Sequence[ExtractionInput]) -> np.ndarray:
        pixels = torch.from_numpy(np.stack([it.pixels for it in items])).to(self.adapter.device)
        cond = self._condition(items)
        shas = [it.sha256 for it in items]
        out = np.full((len(items), len(FEATURE_NAMES)), np.nan, dtype=np.float64)
        families = [f for f in FAMILIES if f in self.feature_set.families]

        def batch() -> Batch:
            z0 = self._encode(pixels)
            noise = NoiseDraws.draw(self.seed, shas, z0.shape[1:], self.config.dl_repeats, z0.device)
            return Batch(self.adapter, z0, noise, self.config)

        if self.share_work:
            b = batch()
            runs = {f: FAMILIES[f].run(b) for f in families}
            depths = {f: FAMILIES[f].depth(self.config) for f in families}
            values = self._scheduler(cond).run(runs, depths)
        else:
            # As the reference code does: each family encodes again and makes its own calls.
            values = {}
            for f in families:
                values.update(self._scheduler(cond).run({f: FAMILIES[f].run(batch())}))
        for f in families:
            out[:, FAMILY_COLUMNS[f]] = values[f].detach().double().cpu().numpy()
        return out

    def _scheduler(self, cond: torch.Tensor | None) -> CallScheduler:
        return CallScheduler(self.adapter, cond, self.passes, share=self.share_work,
                             max_fused=self.max_fused)

    def extract(
        self,
        items: Sequence[ExtractionInput],
        progress: Callable[[int, int], None] | None = None,
        on_batch: Callable[[Sequence[ExtractionInput], np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Features ``[N, 26]`` float64 of ``items``, in order.

        ``progress(done, total)`` is called after each batch; ``on_batch(items, values)``
        receives each batch's rows as soon as they exist (to store them).
        """
        total = len(items)
        out = np.empty((total, len(FEATURE_NAMES)), dtype=np.float64)
        for start in range(0, total, self.batch_size):
            chunk = items[start : start + self.batch_size]
            values = self._batch(chunk)
            out[start : start + len(chunk)] = values
            if on_batch is not None:
                on_batch(chunk, values)
            if progress is not None:
                progress(start + len(chunk), total)
        return out

    def extract_files(
        self,
        files: Sequence[ImageFile],
        conditions: Sequence[ImageCondition] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExtractionResult:
        """Decode, preprocess and extract; a bad file is reported, the others still computed."""
        if conditions is not None and len(conditions) != len(files):
            raise InputError("one condition per file is needed")
        inputs: list[ExtractionInput] = []
        names: list[str] = []
        failures: list[ImageError] = []
        for i, f in enumerate(files):
            try:
                img = open_image(f.data, f.name)
                pixels = to_model_array(img, self.adapter.image_size, self.adapter.image_channels)
            except ImageError as exc:
                failures.append(exc)
                continue
            inputs.append(ExtractionInput(f.sha256, pixels, conditions[i] if conditions else None,
                                          displayed_size(img)))
            names.append(f.name)
        before = PassCounter(self.passes.forward, self.passes.backward)
        values = self.extract(inputs, progress=progress)
        passes = PassCounter(self.passes.forward - before.forward, self.passes.backward - before.backward)
        rows = [FeatureRow(n, it.sha256, v) for n, it, v in zip(names, inputs, values, strict=True)]
        return ExtractionResult(rows=rows, failures=failures, passes=passes)
