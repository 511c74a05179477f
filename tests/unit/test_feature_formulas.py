"""The features' formulas against closed forms, on a hand-made analytic denoiser.

The denoiser predicts ε̂(z, t) = a_t·z + b with scalars a_t, b, so every feature has a
closed form that this test computes independently, in float64 numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from cdi.features import FeatureConfig, FeatureExtractor
from cdi.features.context import PassCounter, image_seed
from cdi.features.extractor import ExtractionInput
from cdi.features.layout import FEATURE_NAMES, FeatureSet
from cdi.models.base import DiffusionAdapter, ImageCondition, ModelIdentity, ModelReference

B_OFFSET = 0.05


def a_of(t: int) -> float:
    return 0.2 + t / 2000.0


class AnalyticAdapter(DiffusionAdapter):
    family = "analytic"

    def __init__(self) -> None:
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.conditioning = "none"
        self.image_channels = 1
        self.image_size = 4
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.identity = ModelIdentity(ModelReference("analytic"), "analytic")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def condition(self, conditions: Sequence[ImageCondition]) -> None:
        return None

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        steps = torch.as_tensor(t, dtype=torch.float32).expand(z_t.shape[0])
        return (0.2 + steps / 2000.0).view(-1, 1, 1, 1) * z_t + B_OFFSET


SEED = 7
SHA = "ab" * 32


def _noise(shape: tuple[int, ...], repeats: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(image_seed(SEED, SHA))
    shared = torch.randn(shape, generator=g).double().numpy()
    dl = torch.randn((repeats, *shape), generator=g).double().numpy()
    return shared, dl


@pytest.fixture(scope="module")
def computed() -> tuple[np.ndarray, np.ndarray, AnalyticAdapter]:
    adapter = AnalyticAdapter()
    z0 = np.random.default_rng(3).uniform(-1, 1, (1, 4, 4)).astype(np.float32)
    ex = FeatureExtractor(adapter, seed=SEED)
    values = ex.extract([ExtractionInput(SHA, z0)])[0]
    return values, z0.astype(np.float64), adapter


def _col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_dl_and_ml_closed_form(computed):
    values, z0, adapter = computed
    cfg = FeatureConfig()
    ab = adapter.alphas_cumprod.numpy()
    shared, dl = _noise(z0.shape, cfg.dl_repeats)

    def loss(t: int, e: np.ndarray) -> float:
        x = math.sqrt(ab[t]) * z0 + math.sqrt(1 - ab[t]) * e
        return float(np.sqrt(((a_of(t) * x + B_OFFSET - e) ** 2).sum()))

    expected_dl = np.mean([loss(cfg.dl_t, dl[r]) for r in range(cfg.dl_repeats)])
    assert values[_col("dl")] == pytest.approx(expected_dl, rel=1e-5)
    for t in cfg.gm_timesteps:
        assert values[_col(f"ml_t{t:03d}")] == pytest.approx(loss(t, shared), rel=1e-5)


def test_pia_and_pian_closed_form(computed):
    values, z0, adapter = computed
    t = FeatureConfig().pia_t
    ab = adapter.alphas_cumprod.numpy()[t]
    eps0 = a_of(0) * z0 + B_OFFSET

    def l5_err(e: np.ndarray) -> float:
        x = math.sqrt(ab) * z0 + math.sqrt(1 - ab) * e
        return float((np.abs(e - (a_of(t) * x + B_OFFSET)) ** 5).sum() ** 0.2)

    assert values[_col("pia")] == pytest.approx(l5_err(eps0), rel=1e-5)
    n = eps0.size
    eps0n = eps0 * n * math.sqrt(2 / math.pi) / np.abs(eps0).sum()
    assert np.abs(eps0n).mean() == pytest.approx(math.sqrt(2 / math.pi))
    assert values[_col("pian")] == pytest.approx(l5_err(eps0n), rel=1e-5)


def test_secmi_closed_form(computed):
    values, z0, adapter = computed
    cfg = FeatureConfig()
    ab = adapter.alphas_cumprod.numpy()

    def step(z: np.ndarray, s: int, s2: int) -> np.ndarray:
        e = a_of(s) * z + B_OFFSET
        x0 = (z - math.sqrt(1 - ab[s]) * e) / math.sqrt(ab[s])
        return math.sqrt(ab[s2]) * x0 + math.sqrt(1 - ab[s2]) * e

    z = z0
    for k in range(0, cfg.secmi_t, cfg.secmi_step):
        z = step(z, k, k + cfg.secmi_step)
    t, s = cfg.secmi_t, cfg.secmi_step
    z_step = step(step(z, t, t + s), t + s, t)
    expected = float(np.sqrt(((z - z_step) ** 2).sum()))
    assert values[_col("secmi_stat")] == pytest.approx(expected, rel=1e-4)


def test_gradient_masking_and_noise_optimisation_closed_form(computed):
    values, z0, adapter = computed
    cfg = FeatureConfig()
    ab = adapter.alphas_cumprod.numpy()
    shared, _ = _noise(z0.shape, cfg.dl_repeats)
    # d‖a·x + b − ε‖₂/dx = a·r/‖r‖: |g| ranks entries as |r| does.
    for t in (0, 300, 900):
        x = math.sqrt(ab[t]) * z0 + math.sqrt(1 - ab[t]) * shared
        r = a_of(t) * x + B_OFFSET - shared
        k = math.ceil(cfg.gm_mask_ratio * r.size)
        m = np.zeros(r.size)
        m[np.argsort(-np.abs(r).ravel(), kind="stable")[:k]] = 1.0
        m = m.reshape(r.shape)
        x_masked = (1 - m) * z0 + m * shared
        expected = np.sqrt(((m * ((shared - z0) - (a_of(t) * x_masked + B_OFFSET))) ** 2).sum())
        assert values[_col(f"gm_t{t:03d}")] == pytest.approx(expected, rel=1e-4)

    t = cfg.no_t
    x_t = math.sqrt(ab[t]) * z0 + math.sqrt(1 - ab[t]) * shared
    delta = np.zeros_like(x_t)
    for _ in range(cfg.no_steps):
        r = a_of(t) * (x_t + delta) + B_OFFSET - shared
        delta = delta - cfg.no_step_size * a_of(t) * r / np.sqrt((r**2).sum())
    final = np.sqrt(((a_of(t) * (x_t + delta) + B_OFFSET - shared) ** 2).sum())
    assert values[_col("no_loss")] == pytest.approx(final, rel=1e-5)
    assert values[_col("no_delta_norm")] == pytest.approx(np.sqrt((delta**2).sum()), rel=1e-5)


def test_gradient_free_set_leaves_gradient_columns_empty():
    adapter = AnalyticAdapter()
    z0 = np.zeros((1, 4, 4), dtype=np.float32)
    ex = FeatureExtractor(adapter, feature_set=FeatureSet.GRADIENT_FREE, seed=SEED)
    values = ex.extract([ExtractionInput(SHA, z0)])[0]
    computed_cols = set(FeatureSet.GRADIENT_FREE.columns)
    for i, name in enumerate(FEATURE_NAMES):
        assert np.isnan(values[i]) == (i not in computed_cols), name
    assert ex.passes.backward == 0


def test_shared_work_gives_the_same_values_with_fewer_passes():
    adapter = AnalyticAdapter()
    rng = np.random.default_rng(5)
    items = [ExtractionInput(f"{i:064x}", rng.uniform(-1, 1, (1, 4, 4)).astype(np.float32)) for i in range(3)]
    shared = FeatureExtractor(adapter, seed=1)
    alone = FeatureExtractor(adapter, seed=1, share_work=False)
    np.testing.assert_allclose(shared.extract(items), alone.extract(items), rtol=1e-6)
    per_image = shared.passes.forward / 3, shared.passes.backward / 3
    cfg = FeatureConfig()
    # Without NO: ≤ 45 forward and 10 backward; NO adds its optimiser's steps, the first shared.
    assert per_image[0] <= 45 + cfg.no_steps
    assert per_image[1] <= 10 + cfg.no_steps - 1
    assert alone.passes.forward > shared.passes.forward


@pytest.mark.parametrize("max_fused", [1, 2, 5, 1000])
def test_fusion_limit_changes_neither_values_nor_pass_counts(max_fused):
    adapter = AnalyticAdapter()
    rng = np.random.default_rng(6)
    items = [ExtractionInput(f"{i:064x}", rng.uniform(-1, 1, (1, 4, 4)).astype(np.float32)) for i in range(4)]
    reference = FeatureExtractor(adapter, seed=2, batch_size=4)
    fused = FeatureExtractor(adapter, seed=2, batch_size=4, max_fused=max_fused)
    np.testing.assert_allclose(fused.extract(items), reference.extract(items), rtol=1e-6)
    assert (fused.passes.forward, fused.passes.backward) == (reference.passes.forward, reference.passes.backward)


@pytest.mark.parametrize("seed", range(5))
def test_round_chunks_keep_order_respect_the_limit_and_are_few(seed):
    from cdi.features.context import Call
    from cdi.features.scheduler import CallScheduler

    rng = np.random.default_rng(seed)
    for _ in range(200):
        sizes = [int(n) for n in rng.integers(1, 40, rng.integers(0, 25))]
        limit = int(rng.integers(1, 120))
        sched = CallScheduler(AnalyticAdapter(), None, PassCounter(), max_fused=limit)
        group = [(i, Call(i, torch.zeros(n, 1), 0)) for i, n in enumerate(sizes)]
        chunks = sched._chunks(group)
        assert [item for chunk in chunks for item in chunk] == group
        for chunk in chunks:
            total = sum(int(c.z.shape[0]) for _, c in chunk)
            assert total <= limit or len(chunk) == 1
        if sizes and max(sizes) <= limit:
            # Never more than twice the fewest possible network calls.
            assert len(chunks) <= 2 * -(-sum(sizes) // limit)
    even = CallScheduler(AnalyticAdapter(), None, PassCounter(), max_fused=128)
    ten = [(i, Call(i, torch.zeros(32, 1), 0)) for i in range(10)]
    assert [sum(int(c.z.shape[0]) for _, c in ch) for ch in even._chunks(ten)] == [128, 96, 96]


@pytest.mark.parametrize("config", [FeatureConfig(), FeatureConfig(secmi_t=40, secmi_step=20, no_steps=2)])
def test_declared_family_depths_are_the_levels_each_family_yields(config):
    from cdi.features.context import Batch, CallResult, NoiseDraws
    from cdi.features.extractor import FAMILIES

    adapter = AnalyticAdapter()
    z0 = torch.zeros(2, 1, 4, 4)
    batch = Batch(adapter, z0, NoiseDraws.draw(0, ["a", "b"], z0.shape[1:], config.dl_repeats, z0.device), config)
    for name, family in FAMILIES.items():
        gen, levels, reply = family.run(batch), 0, None
        try:
            while True:
                calls = next(gen) if reply is None else gen.send(reply)
                levels += 1
                reply = [CallResult(adapter.eps(c.z, c.t, None), torch.zeros_like(c.z)) for c in calls]
        except StopIteration:
            pass
        assert levels == family.depth(config), name


class RecordingAdapter(AnalyticAdapter):
    """The analytic denoiser, recording the number of samples of each network call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.calls.append(int(z_t.shape[0]))
        return super().eps(z_t, t, cond)


def test_levelling_fills_the_deep_chains_rounds_with_the_shallow_families_work(monkeypatch):
    from cdi.features import extractor as extractor_module

    rng = np.random.default_rng(8)
    items = [ExtractionInput(f"{i:064x}", rng.uniform(-1, 1, (1, 4, 4)).astype(np.float32)) for i in range(8)]
    levelled_adapter = RecordingAdapter()
    levelled = FeatureExtractor(levelled_adapter, seed=3, batch_size=8).extract(items)
    # The same extraction with every call due in the round it is asked for.
    flat = {name: extractor_module.Family(f.run, lambda c: 1) for name, f in extractor_module.FAMILIES.items()}
    monkeypatch.setattr(extractor_module, "FAMILIES", flat)
    eager_adapter = RecordingAdapter()
    eager = FeatureExtractor(eager_adapter, seed=3, batch_size=8).extract(items)
    np.testing.assert_allclose(levelled, eager, rtol=1e-6)
    assert sum(levelled_adapter.calls) == sum(eager_adapter.calls)
    # Eagerly, SecMI's and NO's chains run alone in batch-sized calls; levelled, the
    # shallow families' calls join them, so no call is as small and the largest is smaller.
    assert eager_adapter.calls.count(8) >= 8
    assert levelled_adapter.calls.count(8) <= 1
    assert max(levelled_adapter.calls) < max(eager_adapter.calls)
