"""The extractor: runs a chosen feature set over batches of images, sharing work.

Each image is encoded once per batch; each distinct network call is evaluated once
(:class:`~cdi.features.scheduler.CallScheduler`); every random draw comes from the image's own
generator (seed, SHA-256), so an image's features do not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cdi.errors import ImageError, InputError
from cdi.features.config import FeatureConfig
from cdi.features.context import Batch, CallResult, FamilyRun, NoiseDraws, PassCounter
from cdi.features.gradient_masking import gradient_masking
from cdi.features.layout import FEATURE_NAMES, FeatureSet
from cdi.features.loss import denoising_loss, multiple_loss
from cdi.features.noise_optimisation import noise_optimisation, noise_optimisation_depth
from cdi.features.passes import PRECISIONS, MemoryBudget, PassRunner, free_device_memory
from cdi.features.pia import pia, pian
from cdi.features.prefetch import prefetched
from cdi.features.scheduler import CallScheduler
from cdi.features.secmi import secmi_depth, secmi_stat
from cdi.images import ImageFile, displayed_size, open_image, to_model_array
from cdi.models.base import DiffusionAdapter, ImageCondition
from cdi.options import DEFAULT_PROTOCOL
from cdi.reads import columns_read, family_columns, timesteps_of
from cdi.runtime import DEFAULT_BATCH_SIZE


@dataclass(frozen=True)
class _DefaultOptions:
    """A feature set under the default protocol, for :func:`cdi.reads.columns_read`."""

    features: FeatureSet
    protocol: str = DEFAULT_PROTOCOL.value


@dataclass(frozen=True)
class Family:
    """A feature family: its generator, and its depth (the call lists it yields in turn).

    GM yields one list more where a sample's mask is a near-tie (its isolated recomputation,
    see :func:`~cdi.features.gradient_masking.gradient_masking`); rare, so not in its depth.
    """

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
class _Prepared:
    """A batch ready for the network: ``z0`` is ``None`` where each family encodes again."""

    items: Sequence[ExtractionInput]
    pixels: torch.Tensor
    cond: torch.Tensor | None
    z0: torch.Tensor | None


@dataclass(frozen=True)
class ExtractionResult:
    rows: list[FeatureRow]
    failures: list[ImageError]
    passes: PassCounter


#: The largest batch the automatic size picks: past it, a batch gets no faster per image.
MAX_AUTO_BATCH_SIZE = 256
#: GM masks seen before the extractor may decide to isolate GM's gradient passes at once.
GM_MASKS_SEEN = 20
#: The share of the accelerator's free memory that network passes may take.
MEMORY_SHARE = 0.8


class FeatureExtractor:
    """Computes CDI features for batches of images with one model.

    ``columns`` (indices into :data:`~cdi.features.layout.FEATURE_NAMES`) chooses the
    features computed, finer than families (ML and GM at some timesteps only); by default
    those of ``feature_set`` (``verdict``: what the default audit's verdict reads, see
    :mod:`cdi.reads`). The features the default verdict reads are always computed first, on
    their own (with the same calls whatever else is asked), so that they are the same bits
    in every feature set; later features reuse their calls where they can.

    Parameters are stored as given; ``share_work=False`` runs each family on its own, with
    its own encoding and passes, as the reference code does (the benchmark's baseline).

    ``batch_size=None`` picks the batch size from the accelerator's free memory (32 on the
    CPU). ``precision`` is ``auto`` (bfloat16 autocast on CUDA, float32 on the CPU), ``fp32``,
    ``bf16`` or ``fp16``; features are accumulated in float32 whatever it is.
    ``memory_budget`` (bytes) bounds what one network pass may take; by default, on CUDA,
    80 % of the memory free when the extractor is made, and no byte limit on the CPU. A pass
    that runs out of memory anyway is halved and retried, and later passes stay smaller.
    """

    def __init__(
        self,
        adapter: DiffusionAdapter,
        *,
        feature_set: FeatureSet | str = FeatureSet.ALL,
        columns: Sequence[int] | None = None,
        config: FeatureConfig | None = None,
        seed: int = 0,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        share_work: bool = True,
        max_fused: int | None = None,
        max_fused_grad: int | None = None,
        precision: str = "auto",
        memory_budget: int | None = None,
        prefetch: bool = True,
    ) -> None:
        self.adapter = adapter
        self.feature_set = FeatureSet(feature_set)
        if columns is None:
            columns = columns_read(_DefaultOptions(self.feature_set))
        bad = [c for c in columns if not 0 <= int(c) < len(FEATURE_NAMES)]
        if bad or not columns:
            raise InputError(f"columns must be a non-empty list of indices 0 … {len(FEATURE_NAMES) - 1}")
        self.columns = sorted({int(c) for c in columns})
        self.config = config or FeatureConfig()
        self.seed = int(seed)
        if batch_size is not None and batch_size < 1:
            raise InputError("batch_size must be at least 1")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if memory_budget is not None and memory_budget < 1:
            raise InputError("memory_budget must be a positive number of bytes")
        self.auto_batch = batch_size is None
        self._sized = False
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        self.share_work = share_work
        self.max_fused = max_fused
        self.max_fused_grad = max_fused_grad
        self.precision = precision
        self.prefetch = prefetch
        self.passes = PassCounter()
        self._gm_recomputed = self._gm_masks = 0
        self.config.validate_for(adapter.num_train_timesteps)
        if memory_budget is None:
            free = free_device_memory(adapter.device)
            memory_budget = None if free is None else int(MEMORY_SHARE * free)
        self.runner = PassRunner(adapter, precision=precision, budget=MemoryBudget(bytes=memory_budget))
        self._set_counts()

    def _set_counts(self) -> None:
        # A gradient pass keeps every activation for the backward pass, so by default it holds
        # no more samples than a batch: the published code's gradient passes hold a batch, and
        # peak memory then stays at or below theirs. On the CPU, forward passes hold a batch
        # too: fusing 4 batches of 16 px digits is 13 % faster but raises the peak RSS from
        # 599 to 663 MiB, above the published code's 595, and for large images it is slower
        # per sample as well (a 64 px RGB UNet: 0.375, 0.413 and 0.443 s per sample in calls
        # of 1, 4 and 16). On an accelerator, where larger calls keep it busy, forward passes
        # fuse up to 4 batches within the memory budget learned from the first pass.
        counts = self.runner.budget.counts
        fused = 1 if self.adapter.device.type == "cpu" else 4
        counts[False] = int(self.max_fused or fused * self.batch_size)
        counts[True] = int(self.max_fused_grad or min(counts[False], self.batch_size))

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # One image per call: an image's z0 is then the same bits in every batch, which the
        # isolated gradient passes of GM need (see Call.isolated).
        with torch.inference_mode():
            z0 = torch.cat([self.adapter.encode(p[None]).float() for p in pixels])
        return z0.clone()

    def _prepare(self, items: Sequence[ExtractionInput]) -> _Prepared:
        """A batch's pixels on the device, its conditioning and its encoding.

        Runs in the prefetch thread for the next batch while the current one computes.
        """
        pixels = torch.from_numpy(np.stack([it.pixels for it in items]))
        if self.adapter.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.adapter.device, non_blocking=True)
        else:
            pixels = pixels.to(self.adapter.device)
        cond = self._condition(items)
        z0 = self._encode(pixels) if self.share_work else None
        return _Prepared(items, pixels, cond, z0)

    def _condition(self, items: Sequence[ExtractionInput]) -> torch.Tensor | None:
        """The batch's conditioning, image by image for the same reason as :meth:`_encode`."""
        parts = [self.adapter.condition([it.condition], [it.original_size]) for it in items]
        if any(p is None for p in parts):
            return None
        return torch.cat([p for p in parts if p is not None])

    def _stages(self, columns: Sequence[int]) -> list[dict[str, list[int]]]:
        """``columns`` by family, in stages: first those the default verdict reads, then the rest."""
        first = set(columns_read(_DefaultOptions(FeatureSet.VERDICT)))
        stages = [family_columns([c for c in columns if c in first]),
                  family_columns([c for c in columns if c not in first])]
        return [s for s in stages if s]

    def _batch(self, prepared: _Prepared, columns: Sequence[int] | None = None) -> np.ndarray:
        items, pixels, cond = prepared.items, prepared.pixels, prepared.cond
        shas = [it.sha256 for it in items]
        out = np.full((len(items), len(FEATURE_NAMES)), np.nan, dtype=np.float64)
        stages = self._stages(self.columns if columns is None else columns)

        def batch(wanted: dict[str, list[int]], z0: torch.Tensor | None = None) -> Batch:
            z0 = self._encode(pixels) if z0 is None else z0
            noise = NoiseDraws.draw(self.seed, shas, z0.shape[1:], self.config.dl_repeats, z0.device)
            return Batch(self.adapter, z0, noise, self.config, rounding=self.runner.rounding,
                         isolate_gm=self._isolate_gm(),
                         timesteps={f: timesteps_of(f, wanted[f]) for f in ("gm", "ml") if f in wanted})

        cache: dict[Hashable, CallResult] = {}
        for wanted in stages:
            if self.share_work:
                # One cache for every stage: a later stage reuses the earlier stages' calls
                # (PIA's ε̂(z0, 0) is SecMI's first step); an earlier one never sees a later call.
                b = batch(wanted, prepared.z0)
                runs = {f: FAMILIES[f].run(b) for f in wanted}
                depths = {f: FAMILIES[f].depth(self.config) for f in wanted}
                values = self._scheduler(cond, cache).run(runs, depths)
                self._gm_recomputed += b.gm_recomputed
                self._gm_masks += b.gm_masks
            else:
                # As the reference code does: each family encodes again and makes its own calls.
                values = {}
                for f in wanted:
                    values.update(self._scheduler(cond).run({f: FAMILIES[f].run(batch(wanted))}))
            for f, cols in wanted.items():
                out[:, cols] = values[f].detach().double().cpu().numpy()
        return out

    def _isolate_gm(self) -> bool:
        """Whether GM should isolate its gradient passes at once: where more than half of
        the masks seen so far were near-ties, fusing first only adds a pass."""
        return self._gm_masks >= GM_MASKS_SEEN and self._gm_recomputed > self._gm_masks / 2

    def _scheduler(self, cond: torch.Tensor | None,
                   cache: dict[Hashable, CallResult] | None = None) -> CallScheduler:
        return CallScheduler(self.adapter, cond, self.passes, share=self.share_work,
                             max_fused=self.runner.budget.counts[False], runner=self.runner, cache=cache)

    def _auto_batch_size(self, first: ExtractionInput) -> None:
        """Size batches by the memory a gradient pass takes per sample (accelerators only),
        once per extractor: later calls (an audit's rounds, its second set) keep the size."""
        budget = self.runner.budget
        if budget.bytes is None or self._sized:
            return
        self._sized = True
        z0 = self._encode(torch.from_numpy(first.pixels[None]).to(self.adapter.device))
        z = torch.cat([z0, z0])
        t = torch.full((2,), self.config.no_t, dtype=torch.long, device=z.device)
        cond = self._condition([first, first])
        self.runner.run(z, t, cond, torch.zeros_like(z))
        cost = budget.per_sample.get(True)
        # What the memory holds, not the count limits (set from the default batch size, they
        # would only ever let the batch shrink); an out-of-memory back-off still caps it.
        fits = int(budget.bytes // cost) if cost else self.batch_size
        self.batch_size = max(1, min(MAX_AUTO_BATCH_SIZE, fits, budget.backoff.get(True, 1 << 30)))
        self._set_counts()

    def extract(
        self,
        items: Sequence[Any],
        progress: Callable[[int, int], None] | None = None,
        on_batch: Callable[[Sequence[ExtractionInput], np.ndarray], None] | None = None,
        load: Callable[[Any], ExtractionInput] | None = None,
        columns: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Features ``[N, 26]`` float64 of ``items``, in order (NaN where not computed).

        ``columns``: compute these instead of the extractor's :attr:`columns` (the features an
        image still lacks, where the others are stored already).

        ``items`` are :class:`ExtractionInput` s, or anything ``load`` turns into one: then
        each batch is loaded (decoded, preprocessed) in the prefetch thread while the previous
        one computes, and only the batches in flight are held in memory.
        ``progress(done, total)`` is called after each batch; ``on_batch(items, values)``
        receives each batch's inputs and rows as soon as they exist (to store them).
        """
        total = len(items)
        out = np.empty((total, len(FEATURE_NAMES)), dtype=np.float64)
        if total and self.auto_batch:
            self._auto_batch_size(items[0] if load is None else load(items[0]))
        chunks = [items[s : s + self.batch_size] for s in range(0, total, self.batch_size)]

        def prepare(chunk: Sequence[Any]) -> _Prepared:
            return self._prepare(chunk if load is None else [load(item) for item in chunk])

        done = 0
        for prepared in prefetched(chunks, prepare, enabled=self.prefetch):
            values = self._batch(prepared, columns)
            n = len(prepared.items)
            out[done : done + n] = values
            done += n
            if on_batch is not None:
                on_batch(prepared.items, values)
            if progress is not None:
                progress(done, total)
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
        before = PassCounter(self.passes.forward, self.passes.backward)
        total = len(files)
        rows: list[FeatureRow] = []
        failures: list[ImageError] = []

        def decode(chunk: range) -> tuple[list[str], _Prepared | None]:
            names, inputs = [], []
            for i in chunk:
                f = files[i]
                try:
                    inputs.append(self._decoded(f, conditions[i] if conditions else None))
                except ImageError as exc:
                    failures.append(exc)
                    continue
                names.append(f.name)
            return names, (self._prepare(inputs) if inputs else None)

        if self.auto_batch and total:
            first, _ = self._first_decodable(files, conditions)
            if first is not None:
                self._auto_batch_size(first)
        chunks = [range(s, min(s + self.batch_size, total)) for s in range(0, total, self.batch_size)]
        for chunk, (names, prepared) in zip(chunks, prefetched(chunks, decode, enabled=self.prefetch), strict=True):
            if prepared is not None:
                values = self._batch(prepared)
                rows.extend(FeatureRow(n, it.sha256, v) for n, it, v in zip(names, prepared.items, values, strict=True))
            if progress is not None:
                progress(chunk.stop, total)
        passes = PassCounter(self.passes.forward - before.forward, self.passes.backward - before.backward)
        return ExtractionResult(rows=rows, failures=failures, passes=passes)

    def _first_decodable(self, files: Sequence[ImageFile], conditions: Sequence[ImageCondition] | None
                         ) -> tuple[ExtractionInput | None, int]:
        for i, f in enumerate(files):
            try:
                inp = self._decoded(f, conditions[i] if conditions else None)
            except ImageError:
                continue
            return inp, i
        return None, -1

    def _decoded(self, f: ImageFile, condition: ImageCondition | None) -> ExtractionInput:
        """One file decoded into the model's input, with its displayed size (SDXL's original size)."""
        img = open_image(f.data, f.name)
        pixels = to_model_array(img, self.adapter.image_size, self.adapter.image_channels)
        return ExtractionInput(f.sha256, pixels, condition, displayed_size(img))
