"""Every adapter family with real forward passes; detection and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdi.errors import InputError, MalformedModelError, ModelNotFoundError, UnsupportedModelError
from cdi.features import FeatureExtractor
from cdi.features.extractor import ExtractionInput
from cdi.features.layout import FeatureSet
from cdi.models import detect_family, load_model, resolve_reference

CONDITIONS = {
    "pixel": None,
    "pixel-class": 3,
    "latent-kl": None,
    "latent-vq": None,
    "dit": 4,
    "stable-diffusion": "a photo of the sea",
    "stable-diffusion-v": "the cat and the hat",
    "sdxl": "a photo of the sea",
    "sd3": "a photo of the sea",
    "flux": "a photo of the sea",
}

EXPECTED = {
    "pixel": ("pixel", "none"),
    "pixel-class": ("pixel", "class"),
    "latent-kl": ("latent", "none"),
    "latent-vq": ("latent", "none"),
    "dit": ("dit", "class"),
    "stable-diffusion": ("stable-diffusion", "text"),
    "stable-diffusion-v": ("stable-diffusion", "text"),
    "sdxl": ("stable-diffusion-xl", "text"),
    "sd3": ("sd3", "text"),
    "flux": ("flux", "text"),
}


def _inputs(adapter, n: int, condition, seed: int = 0) -> list[ExtractionInput]:
    rng = np.random.default_rng(seed)
    shape = (adapter.image_channels, adapter.image_size, adapter.image_size)
    conds = condition if isinstance(condition, list) else [condition] * n
    return [
        ExtractionInput(f"{i:02d}" * 32, rng.uniform(-1, 1, shape).astype(np.float32), conds[i])
        for i in range(n)
    ]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detects_family_and_conditioning(tiny_model_dirs, name):
    info = detect_family(str(tiny_model_dirs[name]))
    assert (info.family, info.conditioning) == EXPECTED[name]
    assert info.image_size == 16


@pytest.mark.parametrize("name", list(EXPECTED))
def test_batch_invariance_and_determinism(tiny_model_dirs, name):
    adapter = load_model(str(tiny_model_dirs[name]))
    assert all(not p.requires_grad for m in vars(adapter).values()
               if isinstance(m, torch.nn.Module) for p in m.parameters())
    cond = CONDITIONS[name]
    if adapter.conditioning == "text":
        cond = ["a cat", None, "the sea at night", "", "a cat"]
    items = _inputs(adapter, 5, cond)
    a = FeatureExtractor(adapter, batch_size=2, seed=11).extract(items)
    # Reversed order, another batch size, and different neighbours for item 0.
    b = FeatureExtractor(adapter, batch_size=5, seed=11).extract(items[::-1])[::-1]
    others = _inputs(adapter, 3, cond[1:4] if isinstance(cond, list) else cond, seed=99)
    c = FeatureExtractor(adapter, batch_size=4, seed=11).extract([others[0], items[0], others[1], others[2]])
    again = FeatureExtractor(adapter, batch_size=2, seed=11).extract(items)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[0], c[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a, again, rtol=1e-5, atol=1e-6)
    # A different seed draws different noise.
    d = FeatureExtractor(adapter, batch_size=2, seed=12).extract(items)
    assert not np.allclose(a[:, 0], d[:, 0])


def test_text_condition_changes_the_prediction(tiny_model_dirs):
    adapter = load_model(str(tiny_model_dirs["stable-diffusion"]))
    z = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        e1 = adapter.eps(z, 100, adapter.condition(["a cat", "a cat"]))
        e2 = adapter.eps(z, 100, adapter.condition(["the sea", ""]))
    assert not torch.allclose(e1, e2)


def test_dit_keeps_only_the_noise_channels(tiny_model_dirs):
    adapter = load_model(str(tiny_model_dirs["dit"]))
    z = adapter.encode(torch.zeros(2, 3, 16, 16))
    assert z.shape == (2, 4, 8, 8)
    with torch.inference_mode():
        assert adapter.eps(z, 10, adapter.condition([1, 2])).shape == z.shape


def test_v_prediction_is_converted_to_noise(tiny_model_dirs):
    eps_model = load_model(str(tiny_model_dirs["stable-diffusion-v"]))
    z = torch.randn(1, 4, 8, 8)
    cond = eps_model.condition(["x"])
    with torch.inference_mode():
        v = eps_model.unet(z, torch.tensor([100]), encoder_hidden_states=cond).sample
        got = eps_model.eps(z, 100, cond)
    a = float(eps_model.alphas_cumprod[100])
    torch.testing.assert_close(got, a**0.5 * v + (1 - a) ** 0.5 * z)


def test_class_labels_are_checked(tiny_model_dirs):
    adapter = load_model(str(tiny_model_dirs["dit"]))
    with pytest.raises(InputError, match="outside"):
        adapter.condition([10])
    with pytest.raises(InputError, match="integer class label"):
        adapter.condition([None])


def test_identity_hashes_weights(tiny_model_dirs):
    a = load_model(str(tiny_model_dirs["pixel"]))
    b = load_model(str(tiny_model_dirs["pixel-class"]))
    assert a.identity.weight_sha256 and all(len(h) == 64 for h in a.identity.weight_sha256.values())
    assert a.identity.digest != b.identity.digest


def test_gradient_free_set_makes_no_backward_pass(tiny_model_dirs):
    adapter = load_model(str(tiny_model_dirs["latent-kl"]))
    ex = FeatureExtractor(adapter, feature_set=FeatureSet.GRADIENT_FREE)
    ex.extract(_inputs(adapter, 2, None))
    assert ex.passes.backward == 0 and ex.passes.forward > 0


# --- errors -----------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a local model directory"):
        detect_family(str(tmp_path / "nope"))


def test_directory_without_model_index(tmp_path):
    with pytest.raises(MalformedModelError, match="missing model_index.json"):
        detect_family(str(tmp_path))


def test_unsupported_pipeline_is_named(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["pixel"], tmp_path / "m")
    index = json.loads((d / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="KandinskyPipeline is not supported"):
        detect_family(str(d))


def test_missing_component_config_is_named(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["latent-kl"], tmp_path / "m")
    (d / "vae" / "config.json").unlink()
    with pytest.raises(MalformedModelError, match="missing vae/config.json"):
        detect_family(str(d))


def test_missing_weights_fail_at_load(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["pixel"], tmp_path / "m")
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MalformedModelError, match="cannot load unet"):
        load_model(str(d))


def test_wrong_component_class_is_named(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["dit"], tmp_path / "m")
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    (d / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="SD3Transformer2DModel"):
        detect_family(str(d))


def test_invalid_json_is_named(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["pixel"], tmp_path / "m")
    (d / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(MalformedModelError, match="scheduler_config.json is not valid JSON"):
        detect_family(str(d))


def test_missing_component_in_index(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["stable-diffusion"], tmp_path / "m")
    index = json.loads((d / "model_index.json").read_text())
    del index["text_encoder"]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MalformedModelError, match="no text_encoder component"):
        detect_family(str(d))


def test_hub_ids_take_the_hub_path(monkeypatch):
    # No network here: the hub client must be asked (offline, so it fails at once) and its
    # failure must come back as a clear error naming the repository and revision.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    info = resolve_reference("someone/some-model", "v1.0")
    assert not info.is_local and info.revision == "v1.0"
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json of someone/some-model@v1\.0"):
        detect_family("someone/some-model", "v1.0")


def test_shipped_model_names_resolve_to_their_directory():
    from cdi import zoo

    ref = resolve_reference("digits-memorised")
    assert ref.is_local and ref.source == str(zoo.get("digits-memorised").path.resolve())


def _pickle_unet(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file

    d = _copy(src, dst)
    for f in (d / "unet").glob("*.safetensors"):
        torch.save(load_file(f), f.with_suffix(".bin"))
        f.unlink()
    return d


def test_pickled_weights_are_refused_unless_allowed(tiny_model_dirs, tmp_path, monkeypatch):
    from cdi.errors import PickledWeightsError

    monkeypatch.delenv("CDI_ALLOW_PICKLE", raising=False)
    d = _pickle_unet(tiny_model_dirs["pixel"], tmp_path / "m")
    named = r"unet/diffusion_pytorch_model\.bin.*--allow-pickle.*CDI_ALLOW_PICKLE=1"
    with pytest.raises(PickledWeightsError, match=named):
        load_model(str(d))
    allowed = load_model(str(d), allow_pickle=True)
    assert set(allowed.identity.weight_sha256) == {"unet/diffusion_pytorch_model.bin"}
    monkeypatch.setenv("CDI_ALLOW_PICKLE", "1")
    from_env = load_model(str(d))
    assert from_env.identity.digest == allowed.identity.digest
    # The same weights as safetensors give the same predictions.
    safe = load_model(str(tiny_model_dirs["pixel"]))
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(safe.eps(z, 10, None), allowed.eps(z, 10, None))


def test_unhashable_weights_are_an_error_never_an_empty_identity(tiny_model_dirs, monkeypatch):
    import dataclasses

    from cdi.errors import ModelNotDownloadedError
    from cdi.models.base import ModelReference
    from cdi.models.loading import weight_hashes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = detect_family(str(tiny_model_dirs["pixel"]))
    assert weight_hashes(info)
    uncached = dataclasses.replace(info, reference=ModelReference("cdi-audit/not-downloaded", None, is_local=False))
    with pytest.raises(ModelNotDownloadedError, match="not in the local Hugging Face cache.*hf download cdi-audit"):
        weight_hashes(uncached)
