"""LoRA loading (peft folders, diffusers files, LoRA model folders) and reference-calibrated audits."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdi.errors import InputError, PickledWeightsError, UnsupportedModelError
from cdi.models import load_model
from cdi.report import result_to_dict


def _peft_lora(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A rank-2 LoRA on every convolution of a UNet2DModel, in peft's folder format."""
    from diffusers import UNet2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "conv2"], init_lora_weights="gaussian")
    inject_adapter_in_model(config, unet)
    state = get_peft_model_state_dict(unet)
    # Gaussian A and zero B is the identity; a non-zero B makes the LoRA change the model.
    state = {k: (torch.randn_like(v) * 0.05 if "lora_B" in k else v) for k, v in state.items()}
    out.mkdir(parents=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    config.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def pixel_lora(tiny_model_dirs, tmp_path_factory) -> Path:
    return _peft_lora(tiny_model_dirs["pixel"], tmp_path_factory.mktemp("lora") / "adapter")


def _eps(adapter, seed: int = 0) -> torch.Tensor:
    z = torch.randn(2, adapter.image_channels, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return adapter.eps(z, 100, None)


def test_peft_lora_changes_the_model_scales_and_is_identified(tiny_model_dirs, pixel_lora):
    base_dir = str(tiny_model_dirs["pixel"])
    base = load_model(base_dir)
    tuned = load_model(base_dir, lora=str(pixel_lora))
    off = load_model(base_dir, lora=str(pixel_lora), lora_scale=0.0)
    assert not torch.allclose(_eps(base), _eps(tuned))
    torch.testing.assert_close(_eps(off), _eps(base), rtol=1e-5, atol=1e-6)
    # The identity names the base's weights and the LoRA's files, and changes with the scale.
    assert tuned.identity.weight_sha256 == base.identity.weight_sha256
    assert set(tuned.identity.lora_sha256) == {"adapter_model.safetensors", "adapter_config.json"}
    assert len({base.identity.digest, tuned.identity.digest, off.identity.digest}) == 3
    facts = tuned.describe()
    assert facts["lora"]["scale"] == 1.0 and facts["lora"]["sha256"] == tuned.identity.lora_sha256
    assert all(not p.requires_grad for p in tuned.unet.parameters())


def test_lora_model_folder_is_the_same_model(tiny_model_dirs, pixel_lora, tmp_path):
    folder = tmp_path / "fine-tune"
    shutil.copytree(pixel_lora, folder / "lora")
    (folder / "lora_model.json").write_text(json.dumps({"base": str(tiny_model_dirs["pixel"]), "lora": "lora"}))
    direct = load_model(str(tiny_model_dirs["pixel"]), lora=str(pixel_lora))
    named = load_model(str(folder))
    assert named.identity.digest == direct.identity.digest
    assert torch.equal(_eps(named), _eps(direct))
    with pytest.raises(InputError, match="LoRA model already"):
        load_model(str(folder), lora=str(pixel_lora))


def test_pickled_lora_is_refused(tiny_model_dirs, pixel_lora, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.delenv("CDI_ALLOW_PICKLE", raising=False)
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(pixel_lora / "adapter_config.json", d)
    torch.save(load_file(pixel_lora / "adapter_model.safetensors"), d / "adapter_model.bin")
    with pytest.raises(PickledWeightsError, match="--allow-pickle"):
        load_model(str(tiny_model_dirs["pixel"]), lora=str(d))
    load_model(str(tiny_model_dirs["pixel"]), lora=str(d), allow_pickle=True)


def test_lora_that_fits_no_layer_is_refused(tiny_model_dirs, tmp_path):
    from peft import LoraConfig

    d = tmp_path / "wrong"
    d.mkdir()
    LoraConfig(r=2, target_modules=["no_such_layer"]).save_pretrained(str(d))
    from safetensors.torch import save_file

    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        load_model(str(tiny_model_dirs["pixel"]), lora=str(d))


def test_diffusers_lora_file_on_stable_diffusion(tiny_model_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    sd = tiny_model_dirs["stable-diffusion"]
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                init_lora_weights="gaussian"))
    state = {k: (torch.randn_like(v) * 0.1 if "lora_B" in k else v) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    base = load_model(str(sd))
    tuned = load_model(str(sd), lora=str(file))
    half = load_model(str(sd), lora=str(file), lora_scale=0.5)
    cond = base.condition(["a cat"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        e0, e1, eh = base.eps(z, 100, cond), tuned.eps(z, 100, cond), half.eps(z, 100, cond)
    assert not torch.allclose(e0, e1)
    assert not torch.allclose(e1, eh)
    assert set(tuned.identity.lora_sha256) == {"pytorch_lora_weights.safetensors"}


# --- reference-calibrated audits -------------------------------------------------------------


def _files(n: int, seed: int, prefix: str):
    from cdi.images import ImageFile

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(ImageFile(f"{prefix}{i:02d}.png", buf.getvalue()))
    return out


def test_calibrated_audit_tests_the_difference_under_the_same_noise(tiny_model_dirs, pixel_lora):
    from cdi.audit import AuditOptions, audit
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput
    from cdi.images import open_image, to_model_array

    base_dir = str(tiny_model_dirs["pixel"])
    p, u = _files(10, 1, "p"), _files(20, 2, "u")
    opts = AuditOptions(protocol="reference", features="gradient-free", seed=5, n_permutations=99)
    store: dict[str, dict[str, np.ndarray]] = {}

    class Store:
        def load(self, key, shas):
            return {s: store[key][s] for s in shas if s in store.get(key, {})}

        def save(self, key, rows):
            store.setdefault(key, {}).update(rows)

    result = audit(p, u, base_dir, lora=str(pixel_lora), reference_model=base_dir, options=opts,
                   feature_store=Store())
    assert result.calibrated
    # Both models' raw features are cached, each under its own model's key.
    assert result.reference_feature_key != result.feature_key
    raw_t, raw_r = (np.array([store[k][f.sha256] for f in p + u])
                    for k in (result.feature_key, result.reference_feature_key))
    got = np.array([im.features for im in (*result.images_p, *result.images_u)])
    np.testing.assert_array_equal(got, raw_t - raw_r)
    # The reference's features are those of the base alone, with the same per-image noise.
    base = load_model(base_dir)
    items = [ExtractionInput(f.sha256, to_model_array(open_image(f.data, f.name), 16, 3)) for f in p[:3]]
    alone = FeatureExtractor(base, feature_set="gradient-free", seed=5).extract(items)
    np.testing.assert_allclose(alone, raw_r[:3], rtol=1e-5, atol=1e-6, equal_nan=True)
    report = result_to_dict(result)
    text = json.dumps(report)
    assert "reference-calibrated" in text and base.identity.digest in text
    assert result.model["calibration"]["reference_model"]["digest"] == base.identity.digest
    assert result.model["lora"]["sha256"]
    # Uncalibrated (the target's features come from the cache): the mode is stated too.
    plain = audit(p, u, base_dir, lora=str(pixel_lora), options=opts, feature_store=Store())
    assert not plain.calibrated and plain.model["calibration"]["mode"] == "uncalibrated"
    assert plain.cached_images == len(p) + len(u)


def test_reference_must_take_the_same_inputs(tiny_model_dirs):
    from cdi.audit import check_reference

    with pytest.raises(InputError, match="latent"):
        check_reference(load_model(str(tiny_model_dirs["latent-kl"])), load_model(str(tiny_model_dirs["latent-vq"])))
    with pytest.raises(InputError, match="conditioning"):
        check_reference(load_model(str(tiny_model_dirs["pixel"])), load_model(str(tiny_model_dirs["pixel-class"])))


def test_shipped_lora_fine_tune_saw_only_new_digits():
    from cdi import zoo

    lora = zoo.get_lora("digits-hard-lora")
    base = zoo.get(lora.base)
    members, held = set(lora.members), set(lora.held_out)
    assert len(members) == 100 and not members & held
    # The base never saw the LoRA's members, and no shipped model saw its held-out digits.
    assert members <= set(base.held_out) and held <= set(base.held_out)
    digit_models = [m for m in zoo.list_models() if m.manifest.get("dataset") == "sklearn-digits"]
    assert not (members | held) & set().union(*(set(m.members) for m in digit_models))
    assert lora.lora_path.is_dir()
    by_name = load_model(lora.name)
    direct = load_model(lora.base, lora=str(lora.lora_path))
    assert by_name.identity.digest == direct.identity.digest != load_model(lora.base).identity.digest
    with pytest.raises(KeyError, match="digits-hard-lora"):
        zoo.get_lora("no-such-lora")


def test_reference_with_the_audited_models_weights_is_refused_before_any_pass(tiny_model_dirs, pixel_lora, tmp_path):
    from cdi.audit import AuditOptions, audit

    base_dir = str(tiny_model_dirs["pixel"])
    copy = shutil.copytree(base_dir, tmp_path / "same-weights")
    stages: list[str] = []
    opts = AuditOptions(protocol="reference", features="gradient-free", seed=5, n_permutations=99)
    with pytest.raises(InputError, match="the reference model is the audited model itself"):
        audit(_files(10, 1, "p"), _files(20, 2, "u"), base_dir, reference_model=str(copy), options=opts,
              progress=lambda p: stages.append(p.stage))
    assert "validating" in stages and not {"features", "reference", "extracting"} & set(stages)
    # The same base with a LoRA is a different model: it may be calibrated by the base.
    from cdi.audit import check_reference

    check_reference(load_model(base_dir, lora=str(pixel_lora)), load_model(str(copy)))
