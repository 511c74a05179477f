"""Network passes: out-of-memory back-off, memory budgets, precision, and prefetch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_feature_formulas import AnalyticAdapter

from cdi.errors import DeviceMemoryError
from cdi.features import FeatureExtractor
from cdi.features.extractor import ExtractionInput
from cdi.features.passes import MemoryBudget, autocast_dtype, is_out_of_memory
from cdi.features.prefetch import prefetched


class OutOfMemoryAbove(AnalyticAdapter):
    """The analytic denoiser on a device that holds at most ``cap`` samples per pass."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.sizes: list[tuple[int, bool]] = []

    def eps(self, z_t, t, cond):
        n = int(z_t.shape[0])
        if n > self.cap:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {n} samples")
        self.sizes.append((n, z_t.requires_grad))
        return super().eps(z_t, t, cond)


def _items(n: int, seed: int = 0) -> list[ExtractionInput]:
    rng = np.random.default_rng(seed)
    return [ExtractionInput(f"{i:064x}", rng.uniform(-1, 1, (1, 4, 4)).astype(np.float32)) for i in range(n)]


def test_out_of_memory_halves_the_pass_and_loses_no_sample():
    items = _items(6)
    reference = FeatureExtractor(AnalyticAdapter(), seed=4, batch_size=6).extract(items)
    small = OutOfMemoryAbove(cap=5)
    ex = FeatureExtractor(small, seed=4, batch_size=6)
    values = ex.extract(items)
    np.testing.assert_allclose(values, reference, rtol=1e-6)
    assert max(n for n, _ in small.sizes) <= 5
    # The limits learned from the errors hold for the passes that follow.
    assert ex.runner.budget.backoff[False] <= 5 and ex.runner.budget.backoff[True] <= 5
    # Pass counts are per image, whatever the splits.
    plain = FeatureExtractor(AnalyticAdapter(), seed=4, batch_size=6)
    plain.extract(items)
    assert (ex.passes.forward, ex.passes.backward) == (plain.passes.forward, plain.passes.backward)


def test_a_single_sample_that_does_not_fit_is_a_clear_error():
    with pytest.raises(DeviceMemoryError, match="does not fit"):
        FeatureExtractor(OutOfMemoryAbove(cap=0), batch_size=2).extract(_items(2))


def test_only_out_of_memory_errors_are_retried():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


class Recording(AnalyticAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.grad_sizes: list[int] = []

    def eps(self, z_t, t, cond):
        if z_t.requires_grad:
            self.grad_sizes.append(int(z_t.shape[0]))
        # A product of z with itself keeps z for the backward pass: memory per sample.
        return super().eps(z_t, t, cond) + 0.0 * z_t * z_t


def test_gradient_passes_fit_the_memory_budget():
    items = _items(8, seed=1)
    probe = FeatureExtractor(Recording(), seed=1, batch_size=8)
    reference = probe.extract(items)
    per_sample = probe.runner.budget.per_sample[True]
    assert per_sample > 0
    # By default a gradient pass holds at most a batch (the published code's pass size).
    assert max(probe.adapter.grad_sizes) <= 8
    adapter = Recording()
    ex = FeatureExtractor(adapter, seed=1, batch_size=8, memory_budget=int(3.5 * per_sample))
    np.testing.assert_allclose(ex.extract(items), reference, rtol=1e-6)
    # The first pass measures the cost; every later one fits the budget.
    assert max(adapter.grad_sizes[1:]) <= 3
    assert MemoryBudget(bytes=100, per_sample={True: 30.0}).limit(True) == 3
    assert MemoryBudget(bytes=10, per_sample={True: 30.0}).limit(True) == 1


def test_automatic_batch_size_follows_the_memory_budget_and_is_set_once():
    from cdi.features.extractor import MAX_AUTO_BATCH_SIZE
    from cdi.runtime import DEFAULT_BATCH_SIZE

    sizes, passes = [], []
    for budget in (1_500, 3_000, 10**9):
        adapter = OutOfMemoryAbove(10**6)
        ex = FeatureExtractor(adapter, seed=1, batch_size=None, memory_budget=budget)
        first = ex.extract(_items(5))
        calls = len(adapter.sizes)
        np.testing.assert_array_equal(ex.extract(_items(5)), first)
        sizes.append(ex.batch_size)
        passes.append(calls - (len(adapter.sizes) - calls))  # the sizing pass, in the first call only
    per_sample = ex.runner.budget.per_sample[True]
    assert sizes == [int(1_500 // per_sample), int(3_000 // per_sample), MAX_AUTO_BATCH_SIZE]
    assert sizes[1] > DEFAULT_BATCH_SIZE  # larger than the default where the memory allows
    assert passes == [1, 1, 1]


def test_precision_defaults_to_float32_on_the_cpu_and_rejects_unknown_names():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    from cdi.errors import InputError

    with pytest.raises(InputError, match="precision"):
        FeatureExtractor(AnalyticAdapter(), precision="fp8")


def test_bfloat16_autocast_features_are_float32_and_close(tiny_model_dirs):
    from cdi.models import load_model

    adapter = load_model(str(tiny_model_dirs["pixel"]))
    rng = np.random.default_rng(3)
    items = [ExtractionInput(f"{i:02d}" * 32, rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32)) for i in range(3)]
    fp32 = FeatureExtractor(adapter, seed=5, batch_size=3).extract(items)
    bf16 = FeatureExtractor(adapter, seed=5, batch_size=3, precision="bf16").extract(items)
    assert np.isfinite(bf16).all()
    rel = np.abs(bf16 / fp32 - 1)
    assert np.median(rel) < 0.02
    assert not np.array_equal(bf16, fp32)  # autocast did run in reduced precision


def test_prefetch_keeps_order_bounds_the_queue_and_raises_where_it_failed():
    made: list[int] = []
    lock = threading.Lock()

    def prepare(i: int) -> int:
        with lock:
            made.append(i)
        if i == 5:
            raise ValueError("bad batch 5")
        return i * 10

    seen = []
    with pytest.raises(ValueError, match="bad batch 5"):
        for value in prefetched(list(range(8)), prepare, depth=1):
            seen.append(value)
            # The thread is never more than the queue plus the batch it is preparing ahead.
            assert max(made) <= value // 10 + 2
    assert seen == [0, 10, 20, 30, 40]
    assert list(prefetched([1, 2, 3], lambda i: -i)) == [-1, -2, -3]
    assert list(prefetched([1, 2], lambda i: i, enabled=False)) == [1, 2]


def test_inputs_are_loaded_batch_by_batch_in_order_and_give_the_same_features():
    items = _items(10, seed=4)
    reference = FeatureExtractor(AnalyticAdapter(), seed=3, batch_size=2).extract(items)
    loaded: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> ExtractionInput:
        with lock:
            loaded.append(i)
        return items[i]

    in_flight = []

    def on_batch(batch, values):
        with lock:
            in_flight.append(max(loaded) - items.index(batch[-1]))

    got = FeatureExtractor(AnalyticAdapter(), seed=3, batch_size=2).extract(list(range(10)), on_batch=on_batch,
                                                                            load=load)
    np.testing.assert_array_equal(got, reference)
    assert sorted(loaded) == list(range(10))
    # When a batch is done, at most the queued batch and the one being prepared are loaded
    # beyond it: never the whole set up front.
    assert max(in_flight) <= 4 and in_flight[0] < 9


def test_gm_isolates_its_gradient_passes_once_most_masks_are_near_ties():
    from cdi.features.passes import PassRunner

    class EveryMaskNearTie(PassRunner):
        @property
        def rounding(self) -> float:
            return float("inf")

    items = _items(6, seed=2)
    plain = FeatureExtractor(AnalyticAdapter(), seed=6, batch_size=2)
    reference = plain.extract(items)
    ex = FeatureExtractor(AnalyticAdapter(), seed=6, batch_size=2)
    ex.runner = EveryMaskNearTie(ex.adapter, budget=ex.runner.budget)
    np.testing.assert_allclose(ex.extract(items), reference, rtol=1e-6)
    # First batch: fused passes, then every mask again alone (10 more backward passes per
    # image); then GM isolates at once and costs no more than the fused way.
    assert ex._isolate_gm()
    assert ex.passes.backward == plain.passes.backward + 10 * 2


def test_bad_files_do_not_take_the_batch_down(tiny_model_dirs):
    import io

    from PIL import Image

    from cdi.images import ImageFile
    from cdi.models import load_model

    def png(width: int) -> bytes:
        buf = io.BytesIO()
        Image.linear_gradient("L").resize((width, 20)).convert("RGB").save(buf, "PNG")
        return buf.getvalue()

    adapter = load_model(str(tiny_model_dirs["pixel"]))
    good = [ImageFile(f"g{i}.png", png(20 + i)) for i in range(3)]
    bad = [ImageFile("empty.png", b""), ImageFile("text.png", b"hello"), ImageFile("cut.png", good[0].data[:60])]
    result = FeatureExtractor(adapter, batch_size=2).extract_files([bad[0], good[0], bad[1], good[1], bad[2], good[2]])
    assert [r.name for r in result.rows] == ["g0.png", "g1.png", "g2.png"]
    assert sorted(e.name for e in result.failures) == ["cut.png", "empty.png", "text.png"]
    assert all(np.isfinite(r.values).all() for r in result.rows)
