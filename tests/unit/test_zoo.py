"""The shipped models (cdi/zoo/models): manifests consistent, weights load, export writes PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cdi import zoo
from cdi.zoo import digits

EXPECTED = {"digits-memorised", "digits-hard", "digits-dit", "digits-latent"}
FOLDERS = {"pixel": ("unet", "scheduler"), "latent": ("vae", "unet", "scheduler"),
           "dit": ("transformer", "vae", "scheduler")}
PIPELINES = {"pixel": "DDPMPipeline", "latent": "LDMPipeline", "dit": "DiTPipeline"}

MODELS = zoo.list_models()


def test_the_four_models_are_shipped() -> None:
    assert {m.name for m in MODELS} == EXPECTED


def test_get_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="digits-memorised"):
        zoo.get("no-such-model")
    assert zoo.get("digits-memorised").path == zoo.MODELS_DIR / "digits-memorised"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_manifest_is_consistent(model: zoo.ZooModel) -> None:
    m = model.manifest
    assert m["name"] == model.name == model.path.name
    assert m["dataset"] == "sklearn-digits" and m["image_channels"] == 1
    assert model.family in FOLDERS and model.conditioning in ("none", "class")
    assert (model.conditioning == "class") == (model.family == "dit")
    members, held_out = set(model.members), set(model.held_out)
    assert list(model.members) == sorted(members) and list(model.held_out) == sorted(held_out)
    assert len(members) == len(model.members) and len(held_out) == len(model.held_out)
    assert not members & held_out
    assert all(0 <= i < digits.count() for i in members | held_out)
    assert len(held_out) >= 300
    if model.name == "digits-memorised":
        assert len(members) == 100
    for key in ("steps", "batch_size", "lr", "seed", "parameters", "seconds"):
        assert key in m["training"]
    measured = m["measured"]
    assert measured["n_members"] == len(members) and measured["n_held_out"] == len(held_out)
    assert 0.5 < measured["dl_auc_t100"] <= 1.0  # members have the lower loss


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_layout_and_configs(model: zoo.ZooModel) -> None:
    index = json.loads((model.path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[model.family]
    for folder in FOLDERS[model.family]:
        assert folder in index
        assert (model.path / folder).is_dir()
        cfg = model.path / folder / ("scheduler_config.json" if folder == "scheduler" else "config.json")
        assert cfg.is_file(), cfg
        if folder != "scheduler":
            assert (model.path / folder / "diffusion_pytorch_model.safetensors").is_file()
    sched = json.loads((model.path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["num_train_timesteps"] == 1000
    if model.family != "pixel":
        vae = json.loads((model.path / "vae" / "config.json").read_text())
        assert vae["in_channels"] == 1 and vae["sample_size"] == model.image_size
        assert vae["scaling_factor"] > 0
    if model.family == "dit":
        tr = json.loads((model.path / "transformer" / "config.json").read_text())
        assert tr["out_channels"] == 2 * tr["in_channels"]  # learned sigma
        assert tr["num_embeds_ada_norm"] >= 10


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_loads_in_float32_and_runs(model: zoo.ZooModel) -> None:
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

    f32 = torch.float32
    DDPMScheduler.from_pretrained(model.path, subfolder="scheduler")
    x = torch.zeros(2, 1, model.image_size, model.image_size)
    t = torch.tensor([100, 100])
    with torch.no_grad():
        if model.family != "pixel":
            vae = AutoencoderKL.from_pretrained(model.path, subfolder="vae", torch_dtype=f32)
            assert all(p.dtype == f32 for p in vae.parameters())
            x = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        if model.family == "dit":
            net = DiTTransformer2DModel.from_pretrained(model.path, subfolder="transformer", torch_dtype=f32)
            out = net(x, timestep=t, class_labels=torch.tensor([3, 7])).sample
            assert out.shape[1] == 2 * x.shape[1]
        else:
            net = UNet2DModel.from_pretrained(model.path, subfolder="unet", torch_dtype=f32)
            out = net(x, t).sample
            assert out.shape == x.shape
    assert all(p.dtype == f32 for p in net.parameters())
    assert torch.isfinite(out).all()


def test_memorised_model_has_lower_loss_on_members() -> None:
    """From the shipped weights: 20 members against 20 held-out digits, fixed noise."""
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler, UNet2DModel

    from cdi.images import to_model_array

    model = zoo.get("digits-memorised")
    net = UNet2DModel.from_pretrained(model.path, subfolder="unet", torch_dtype=torch.float32).eval()
    a = float(DDPMScheduler.from_pretrained(model.path, subfolder="scheduler").alphas_cumprod[100])
    idx = list(model.members[:20]) + list(model.held_out[:20])
    size = model.image_size
    x0 = torch.from_numpy(np.stack([to_model_array(digits.image(i, size), size, 1) for i in idx]))
    x0 = x0.repeat_interleave(5, dim=0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = net(a**0.5 * x0 + (1 - a) ** 0.5 * eps, torch.full((x0.shape[0],), 100)).sample
    loss = (pred - eps).flatten(1).norm(dim=1).reshape(len(idx), 5).mean(dim=1)
    assert loss[:20].mean() < loss[20:].mean()


@pytest.mark.parametrize("name", ["digits-memorised", "digits-dit"])
def test_export_writes_readable_pngs(name: str, tmp_path) -> None:
    model = zoo.get(name)
    members, held_out = model.export(tmp_path, members=3, held_out=4)
    assert len(members) == 3 and len(held_out) == 4
    assert [p.parent.name for p in members] == ["published"] * 3
    assert [p.parent.name for p in held_out] == ["unpublished"] * 4
    assert [p.name for p in members] == [zoo.ZooModel.file_name(i) for i in model.members[:3]]
    for p, i in zip(members + held_out, list(model.members[:3]) + list(model.held_out[:4]), strict=True):
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (model.image_size, model.image_size)
            assert np.array_equal(np.asarray(img), np.asarray(digits.image(i, model.image_size)))
    labels = model.labels_for(model.members[:3])
    assert labels == {zoo.ZooModel.file_name(i): digits.label(i) for i in model.members[:3]}
    assert (tmp_path / "labels.csv").is_file() == (model.conditioning == "class")
    with pytest.raises(ValueError):
        model.export(tmp_path / "too-many", members=len(model.members) + 1, held_out=1)
