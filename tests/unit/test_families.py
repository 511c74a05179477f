"""SDXL, SD3 and Flux: the adapters condition, call and parameterise each network exactly as
its diffusers pipeline does, on tiny random-weight models saved as full diffusers folders.

(Real forward passes, batch invariance, determinism and finite features of every family are
in test_adapters.py; this file checks the family-specific parts against the pipelines.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdi.errors import MalformedModelError, UnsupportedModelError
from cdi.features import FeatureExtractor
from cdi.features.config import FeatureConfig
from cdi.features.extractor import ExtractionInput
from cdi.features.layout import FeatureSet
from cdi.models import detect_family, load_model

CAPTIONS = ["a cat", "", "the sea at night"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# --- SDXL ------------------------------------------------------------------------------


def test_sdxl_conditioning_is_the_pipelines(tiny_model_dirs):
    from diffusers import StableDiffusionXLPipeline

    adapter = load_model(str(tiny_model_dirs["sdxl"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs["sdxl"])
    with torch.inference_mode():
        states, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    sizes = [(30, 40), None, (1024, 768)]
    ours = adapter._packing.unpack(adapter.condition(CAPTIONS, sizes))
    torch.testing.assert_close(ours[0], states)
    torch.testing.assert_close(ours[1], pooled)
    for row, size in zip(ours[2], sizes, strict=True):
        expected = pipe._get_add_time_ids(size or (16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                          text_encoder_projection_dim=8)[0]
        torch.testing.assert_close(row, expected)

    # ε̂ is the UNet's output called as the pipeline calls it (ε-prediction).
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = pipe.unet(z, torch.tensor([100, 100, 100]), encoder_hidden_states=states,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": ours[2]}).sample
        torch.testing.assert_close(adapter.eps(z, 100, adapter.condition(CAPTIONS, sizes)), expected)


def test_sdxl_original_size_reaches_the_noise_prediction(tiny_model_dirs):
    # The extractor hands condition() each image's displayed size (the next test); here that
    # size reaches the UNet's output, in one forward pass per size.
    adapter = load_model(str(tiny_model_dirs["sdxl"]))
    small, large, default = (adapter.condition(["a cat"], [size]) for size in [(16, 16), (900, 1200), None])
    torch.testing.assert_close(default, small)  # no size: the model's own resolution
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eps_small, eps_large = (adapter.eps(z, 100, c) for c in (small, large))
    assert not torch.allclose(eps_small, eps_large)


def test_extract_files_passes_each_images_displayed_size(tiny_model_dirs, monkeypatch):
    import io

    from PIL import Image

    from cdi.images import ImageFile

    adapter = load_model(str(tiny_model_dirs["sdxl"]))
    seen: list[object] = []
    original = adapter.condition

    def spy(conditions, original_sizes=None):
        seen.extend(original_sizes or [])
        return original(conditions, original_sizes)

    monkeypatch.setattr(adapter, "condition", spy)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    ex = FeatureExtractor(adapter, seed=3, feature_set=FeatureSet.GRADIENT_FREE)
    ex.extract_files([ImageFile("a.png", buf.getvalue())], ["a red square"])
    assert seen and set(seen) == {(30, 40)}


def test_sdxl_unet_without_size_conditioning_is_refused(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["sdxl"], tmp_path / "m")
    _edit_json(d / "unet" / "config.json", addition_embed_type=None)
    with pytest.raises(MalformedModelError, match="addition_embed_type must be 'text_time'"):
        load_model(str(d))


# --- SD3 -------------------------------------------------------------------------------


def test_sd3_conditioning_and_velocity_are_the_pipelines(tiny_model_dirs):
    from diffusers import StableDiffusion3Pipeline

    adapter = load_model(str(tiny_model_dirs["sd3"]))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dirs["sd3"])
    with torch.inference_mode():
        states, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=256)
    cond = adapter.condition(CAPTIONS)
    ours = adapter._packing.unpack(cond)
    torch.testing.assert_close(ours[0], states)
    torch.testing.assert_close(ours[1], pooled)

    # The network sees σ·1000 and predicts v = ε − z0; ε̂ = z + (1 − σ)·v.
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = float(adapter.schedule.s[300])
    with torch.inference_mode():
        v = pipe.transformer(hidden_states=z, encoder_hidden_states=states, pooled_projections=pooled,
                             timestep=torch.full((3,), sigma * 1000)).sample
        torch.testing.assert_close(adapter.eps(z, 300, cond), z + (1 - sigma) * v)


def test_sd3_latents_are_shifted_then_scaled(tiny_model_dirs):
    adapter = load_model(str(tiny_model_dirs["sd3"]))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        mean = adapter.autoencoder.encode(x).latent_dist.mean
        torch.testing.assert_close(adapter.encode(x), (mean - 0.1) * 0.5)


def test_sd3_sigmas_are_the_schedulers(tiny_model_dirs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = load_model(str(tiny_model_dirs["sd3"]))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dirs["sd3"], subfolder="scheduler")
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    # The scheduler's training σ run from t = T down to t = 1: σ(t) = shift(t/T).
    theirs = sched.sigmas.double().flip(0)
    ours = adapter.schedule.s
    torch.testing.assert_close(ours[1:], theirs[:-1], rtol=1e-6, atol=1e-7)
    # t = 0 (PIA) is the smallest σ the scheduler allows, not 0.
    assert float(ours[0]) == pytest.approx(sched.sigma_min, rel=1e-6) and float(ours[0]) > 0
    torch.testing.assert_close(adapter.schedule.model_timesteps, ours * 1000)
    assert adapter.describe()["flow_shift"] == {"shift": 3.0}


def test_sd3_without_t5_uses_zeros_as_its_pipeline_does(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["sd3"], tmp_path / "m")
    _edit_json(d / "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    shutil.rmtree(d / "text_encoder_3")
    shutil.rmtree(d / "tokenizer_3")
    adapter = load_model(str(d))
    assert adapter.text_encoder_3 is None
    states, _ = adapter._packing.unpack(adapter.condition(["a cat"]))
    assert states.shape == (1, 16 + 256, 32)
    assert torch.all(states[:, 16:] == 0) and torch.any(states[:, :16] != 0)
    assert "text_encoder_3/model.safetensors" not in adapter.identity.weight_sha256


# --- Flux ------------------------------------------------------------------------------


def test_flux_conditioning_packing_and_guidance_are_the_pipelines(tiny_model_dirs):
    from diffusers import FluxPipeline

    adapter = load_model(str(tiny_model_dirs["flux"]))
    pipe = FluxPipeline.from_pretrained(tiny_model_dirs["flux"])
    with torch.inference_mode():
        states, pooled, text_ids = pipe.encode_prompt(CAPTIONS, None, device="cpu", max_sequence_length=512)
    cond = adapter.condition(CAPTIONS)
    ours = adapter._packing.unpack(cond)
    torch.testing.assert_close(ours[0], states)
    torch.testing.assert_close(ours[1], pooled)
    assert adapter.guidance == 3.5

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = float(adapter.schedule.s[500])
    with torch.inference_mode():
        packed = pipe._pack_latents(z, 3, 4, 8, 8)
        ids = pipe._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32)
        v = pipe.transformer(hidden_states=packed, timestep=torch.full((3,), sigma), guidance=torch.full((3,), 3.5),
                             pooled_projections=pooled, encoder_hidden_states=states, txt_ids=text_ids,
                             img_ids=ids).sample
        v = pipe._unpack_latents(v, 16, 16, pipe.vae_scale_factor)
        torch.testing.assert_close(adapter.eps(z, 500, cond), z + (1 - sigma) * v)


def test_flux_sigmas_follow_the_resolution_shift(tiny_model_dirs):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    adapter = load_model(str(tiny_model_dirs["flux"]))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dirs["flux"], subfolder="scheduler")
    seq = (16 // 2 // 2) ** 2  # 16 px → 8×8 latents → 4×4 packed tokens
    mu = calculate_shift(seq, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    facts = adapter.describe(FeatureConfig().timesteps())
    assert facts["flow_shift"]["mu"] == pytest.approx(mu) and facts["flow_shift"]["image_seq_len"] == seq
    # What FluxPipeline's scheduler does with σ = t/T and this μ (t = 0 → its smallest, 1/T).
    grid = np.maximum(np.arange(1000), 1) / 1000
    sched.set_timesteps(sigmas=grid[::-1].copy(), mu=mu)
    theirs = sched.sigmas[:-1].double().flip(0)
    torch.testing.assert_close(adapter.schedule.s, theirs, rtol=1e-5, atol=1e-6)
    # Flux's pipeline gives the transformer σ itself (it multiplies by 1000 inside).
    torch.testing.assert_close(adapter.schedule.model_timesteps, adapter.schedule.s)
    assert set(facts["sigmas"]) == {str(t) for t in FeatureConfig().timesteps()}


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_dynamic_shift_grid_matches_the_scheduler_at_any_resolution(shift_type):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cdi.models.schedule import flow_grid_sigmas, resolution_shift_mu

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=shift_type,
                                            base_shift=0.5, max_shift=1.15)
    for tokens in (256, 1024, 4096):  # 512, 1024 and 2048 px with Flux's 8× autoencoder
        mu = resolution_shift_mu(tokens, 256, 4096, 0.5, 1.15)
        grid = np.maximum(np.arange(1000), 1) / 1000
        sched.set_timesteps(sigmas=grid[::-1].copy(), mu=mu)
        torch.testing.assert_close(flow_grid_sigmas(1000, mu=mu, shift_type=shift_type),
                                   sched.sigmas[:-1].double().flip(0), rtol=1e-5, atol=1e-6)


def test_flux_without_guidance_embedding_gets_none(tiny_model_dirs, tmp_path):
    import tiny_models as tm

    d = tm.build_flux(tmp_path / "schnell", guidance=False)
    adapter = load_model(str(d))
    assert adapter.guidance is None and adapter.describe()["guidance"] is None
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        assert torch.isfinite(adapter.eps(z, 900, adapter.condition(["x"]))).all()


def test_flux_default_resolution_is_the_pipelines(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["flux"], tmp_path / "m")
    _edit_json(d / "transformer" / "config.json", sample_size=None)
    # FluxPipeline's default: 128 latents per side, times the autoencoder's factor (2 here).
    assert detect_family(str(d)).image_size == 256


def test_step_dependent_flow_scheduler_options_are_refused(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["sd3"], tmp_path / "m")
    _edit_json(d / "scheduler" / "scheduler_config.json", shift_terminal=0.02)
    with pytest.raises(UnsupportedModelError, match="shift_terminal is not supported"):
        load_model(str(d))


# --- LoRA ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "pipeline", "layers"), [
    ("sdxl", "StableDiffusionXLPipeline", "unet_lora_layers"),
    ("sd3", "StableDiffusion3Pipeline", "transformer_lora_layers"),
    ("flux", "FluxPipeline", "transformer_lora_layers"),
])
def test_diffusers_lora_file_on_each_family(tiny_model_dirs, tmp_path, name, pipeline, layers):
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = load_model(str(tiny_model_dirs[name]))
    net = base.denoiser
    torch.manual_seed(1)
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                               init_lora_weights="gaussian"))
    state = {k: (torch.randn_like(v) * 0.1 if "lora_B" in k else v) for k, v in get_peft_model_state_dict(net).items()}
    getattr(diffusers, pipeline).save_lora_weights(str(tmp_path), **{layers: state})
    file = tmp_path / "pytorch_lora_weights.safetensors"
    plain = load_model(str(tiny_model_dirs[name]))
    tuned = load_model(str(tiny_model_dirs[name]), lora=str(file))
    off = load_model(str(tiny_model_dirs[name]), lora=str(file), lora_scale=0.0)
    cond = plain.condition(["a cat"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        e0, e1, e_off = plain.eps(z, 100, cond), tuned.eps(z, 100, cond), off.eps(z, 100, cond)
    assert not torch.allclose(e0, e1)
    torch.testing.assert_close(e_off, e0)
    assert set(tuned.identity.lora_sha256) == {"pytorch_lora_weights.safetensors"}


# --- report ----------------------------------------------------------------------------


def test_report_records_the_sigma_grid(tiny_model_dirs):
    from cdi.audit import AuditOptions, model_record
    from cdi.report.model import model_record_of

    opts = AuditOptions()
    for name, schedule in (("flux", "flow"), ("sdxl", "ddpm")):
        adapter = load_model(str(tiny_model_dirs[name]))
        record = model_record_of(model_record(adapter, opts))
        assert record.noise_schedule == schedule
        if schedule == "flow":
            assert record.prediction_type == "flow"
            assert record.flow_sigmas is not None
            assert set(record.flow_sigmas) == {str(t) for t in opts.feature_config.timesteps()}
            for t, sigma in record.flow_sigmas.items():
                assert sigma == pytest.approx(float(adapter.schedule.s[int(t)]))
            assert record.details["flow_shift"]["mu"] > 0
        else:
            assert record.flow_sigmas is None and record.prediction_type == "epsilon"


# --- detection and malformed folders ---------------------------------------------------


@pytest.mark.parametrize(("name", "folder"), [("sdxl", "text_encoder_2"), ("sd3", "tokenizer_3"),
                                              ("flux", "transformer")])
def test_missing_component_folder_is_named(tiny_model_dirs, tmp_path, name, folder):
    d = _copy(tiny_model_dirs[name], tmp_path / "m")
    shutil.rmtree(d / folder)
    with pytest.raises(MalformedModelError, match=f"missing {folder}/"):
        detect_family(str(d))


@pytest.mark.parametrize(("name", "component"), [("sdxl", "tokenizer_2"), ("sd3", "text_encoder_2"),
                                                 ("flux", "text_encoder_2")])
def test_component_missing_from_the_index_is_named(tiny_model_dirs, tmp_path, name, component):
    d = _copy(tiny_model_dirs[name], tmp_path / "m")
    _edit_json(d / "model_index.json", **{component: None})
    with pytest.raises(MalformedModelError, match=f"lists no {component} component"):
        detect_family(str(d))


def test_component_of_the_wrong_class_is_named(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["flux"], tmp_path / "m")
    _edit_json(d / "transformer" / "config.json", _class_name="SD3Transformer2DModel")
    with pytest.raises(UnsupportedModelError, match="transformer is a SD3Transformer2DModel.*FluxTransformer2DModel"):
        detect_family(str(d))


def test_flow_family_with_a_ddpm_scheduler_is_refused(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["sd3"], tmp_path / "m")
    _edit_json(d / "scheduler" / "scheduler_config.json", _class_name="DDPMScheduler")
    with pytest.raises(UnsupportedModelError, match="scheduler is a DDPMScheduler"):
        detect_family(str(d))


def test_component_without_a_class_is_named(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["sdxl"], tmp_path / "m")
    _edit_json(d / "model_index.json", text_encoder_2=["transformers"])
    _edit_json(d / "text_encoder_2" / "config.json", _class_name=None, architectures=None)
    with pytest.raises(MalformedModelError, match="cannot tell the class of component text_encoder_2"):
        detect_family(str(d))


# --- single-file checkpoints -----------------------------------------------------------


@pytest.fixture(scope="session")
def single_file(tiny_model_dirs, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Stable Diffusion model as one original-layout .safetensors, and its configs."""
    import tiny_models as tm

    root = tmp_path_factory.mktemp("single-file")
    file = tm.save_single_file(tiny_model_dirs["stable-diffusion"], root / "tiny-sd15.safetensors")
    return file, tm.config_folder(tiny_model_dirs["stable-diffusion"], root / "configs")


def test_single_file_is_the_same_model_identified_by_its_hash(tiny_model_dirs, single_file):
    import hashlib

    file, configs = single_file
    assert not list(configs.rglob("*.safetensors"))
    adapter = load_model(str(file), config=str(configs))
    folder = load_model(str(tiny_model_dirs["stable-diffusion"]))
    assert adapter.family == "stable-diffusion" and adapter.identity.reference.config == str(configs)
    assert adapter.identity.weight_sha256 == {file.name: hashlib.sha256(file.read_bytes()).hexdigest()}
    assert adapter.identity.digest != folder.identity.digest
    assert adapter.describe()["config"] == str(configs)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(adapter.eps(z, 250, adapter.condition(["a cat", ""])),
                                   folder.eps(z, 250, folder.condition(["a cat", ""])), rtol=0, atol=0)
    rng = np.random.default_rng(0)
    items = [ExtractionInput(f"{i:02d}" * 32, rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32), "a cat")
             for i in range(2)]
    np.testing.assert_allclose(FeatureExtractor(adapter, seed=5).extract(items),
                               FeatureExtractor(folder, seed=5).extract(items), rtol=1e-5, atol=1e-6)


def test_sdxl_single_file_is_the_same_model(tiny_model_dirs, tmp_path):
    import tiny_models as tm

    folder_dir = tiny_model_dirs["sdxl"]
    file = tm.save_single_file(folder_dir, tmp_path / "tiny-sdxl.safetensors")
    configs = tm.config_folder(folder_dir, tmp_path / "configs")
    adapter = load_model(str(file), config=str(configs))
    folder = load_model(str(folder_dir))
    assert adapter.family == "stable-diffusion-xl" and set(adapter.identity.weight_sha256) == {file.name}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sizes = [(30, 40), None]
    with torch.inference_mode():
        torch.testing.assert_close(adapter.eps(z, 600, adapter.condition(["a cat", ""], sizes)),
                                   folder.eps(z, 600, folder.condition(["a cat", ""], sizes)), rtol=0, atol=0)


def test_file_lacking_a_component_is_named_and_config_weights_follow_the_pickle_rule(
        tiny_model_dirs, tmp_path, monkeypatch):
    import tiny_models as tm
    from safetensors.torch import load_file

    from cdi.errors import PickledWeightsError

    monkeypatch.delenv("CDI_ALLOW_PICKLE", raising=False)
    sd = tiny_model_dirs["stable-diffusion"]
    file = tm.save_single_file(sd, tmp_path / "unet-and-vae.safetensors", text_encoders=False)
    configs = tm.config_folder(sd, tmp_path / "configs")
    with pytest.raises(MalformedModelError, match="cannot load it as a StableDiffusionPipeline.*CLIPTextModel"):
        load_model(str(file), config=str(configs))
    # Weights in the config folder may be loaded for what the file lacks: pickles are refused.
    torch.save(load_file(sd / "text_encoder" / "model.safetensors"), configs / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(PickledWeightsError, match=r"text_encoder/pytorch_model\.bin"):
        load_model(str(file), config=str(configs))


def test_weights_in_the_config_folder_are_part_of_the_identity(single_file, tmp_path):
    file, configs = single_file
    with_weights = tmp_path / "configs"
    shutil.copytree(configs, with_weights)
    vae = with_weights / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(vae))
    info = detect_family(str(file), config=str(with_weights))
    from cdi.models.loading import weight_hashes

    hashes = weight_hashes(info)
    assert set(hashes) == {file.name, "config/vae/diffusion_pytorch_model.safetensors"}
    assert set(weight_hashes(detect_family(str(file), config=str(configs)))) == {file.name}


def test_single_file_needs_its_configs(single_file, tiny_model_dirs):
    from cdi.errors import InputError, ModelNotFoundError

    file, configs = single_file
    with pytest.raises(MalformedModelError, match=r"single-file checkpoint: give its configs with --config DIR"):
        detect_family(str(file))
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        detect_family(str(file), config=str(configs / "nope"))
    with pytest.raises(InputError, match="not a single-file checkpoint"):
        detect_family(str(tiny_model_dirs["pixel"]), config=str(configs))
    text = file.with_suffix(".txt")
    text.write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file but not a checkpoint"):
        detect_family(str(text), config=str(configs))


def test_single_file_that_does_not_fit_its_configs_is_named(single_file, tiny_model_dirs, tmp_path):
    import tiny_models as tm

    file, _ = single_file
    sdxl_configs = tm.config_folder(tiny_model_dirs["sdxl"], tmp_path / "sdxl-configs")
    with pytest.raises(MalformedModelError, match="cannot load it as a StableDiffusionXLPipeline"):
        load_model(str(file), config=str(sdxl_configs))
    pixel_configs = tm.config_folder(tiny_model_dirs["pixel"], tmp_path / "pixel-configs")
    with pytest.raises(UnsupportedModelError, match="single-file checkpoints of DDPMPipeline models"):
        detect_family(str(file), config=str(pixel_configs))


def test_pickled_single_file_is_refused_unless_allowed(single_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from cdi.errors import PickledWeightsError

    monkeypatch.delenv("CDI_ALLOW_PICKLE", raising=False)
    file, configs = single_file
    ckpt = tmp_path / "tiny-sd15.ckpt"
    torch.save({"state_dict": load_file(file)}, ckpt)
    with pytest.raises(PickledWeightsError, match=r"tiny-sd15\.ckpt.*--allow-pickle"):
        load_model(str(ckpt), config=str(configs))
    allowed = load_model(str(ckpt), config=str(configs), allow_pickle=True)
    safe = load_model(str(file), config=str(configs))
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(allowed.eps(z, 10, allowed.condition(["x"])), safe.eps(z, 10, safe.condition(["x"])))
    assert set(allowed.identity.weight_sha256) == {"tiny-sd15.ckpt"}


def test_cli_takes_a_single_file_with_config(single_file, tmp_path, capsys):
    import csv

    from PIL import Image

    from cdi.cli import main

    file, configs = single_file
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 16), (40 * i, 90, 200)).save(images / f"{i}.png")
    args = ["features", "--model", str(file), "--images", str(images), "--features", "gradient-free", "--out"]
    assert main([*args, str(tmp_path / "a.csv")]) != 0
    err = capsys.readouterr().err
    assert "--config DIR" in err and "Traceback" not in err
    assert main([*args, str(tmp_path / "b.csv"), "--config", str(configs)]) == 0
    rows = list(csv.reader((tmp_path / "b.csv").open()))
    assert len(rows) == 3


def test_sd3_sequence_length_uses_the_transformers_patch_size(tiny_model_dirs, tmp_path):
    from cdi.models.sd3 import SD3Adapter

    d = _copy(tiny_model_dirs["sd3"], tmp_path / "m")
    _edit_json(d / "scheduler" / "scheduler_config.json", use_dynamic_shifting=True)
    info = detect_family(str(d))
    assert SD3Adapter.image_seq_len(info) == (16 // 2 // 2) ** 2
    _edit_json(d / "transformer" / "config.json", patch_size=1)
    assert SD3Adapter.image_seq_len(detect_family(str(d))) == (16 // 2) ** 2


def test_clip_states_pad_to_the_length_asked(tiny_model_dirs):
    from cdi.models.text import clip_states

    adapter = load_model(str(tiny_model_dirs["sd3"]))
    states, _ = clip_states(adapter.tokenizer_2, adapter.text_encoder_2, ["a cat"], adapter.device,
                            penultimate=True, max_length=8)
    assert states.shape[1] == 8
    assert adapter.t5_tokens == 256 and load_model(str(tiny_model_dirs["flux"])).t5_tokens == 512


def test_every_family_is_detected_and_has_one_adapter():
    # The names are declared once (cdi.models.base.FamilyName); every table covers each of them.
    from cdi.models.base import FAMILIES
    from cdi.models.detect import FAMILY_COMPONENTS, PIPELINE_FAMILIES
    from cdi.models.diffusers_base import DiffusersAdapter

    def leaves(cls: type) -> set[type]:
        subs = set(cls.__subclasses__())
        return subs.union(*(leaves(s) for s in subs))

    import importlib
    import pkgutil

    import cdi.models

    for module in pkgutil.iter_modules(cdi.models.__path__, "cdi.models."):
        importlib.import_module(module.name)
    adapters = [c for c in leaves(DiffusersAdapter) if "family" in vars(c)]
    assert sorted(c.family for c in adapters) == sorted(FAMILIES)
    assert set(FAMILY_COMPONENTS) == set(PIPELINE_FAMILIES.values()) == set(FAMILIES)
