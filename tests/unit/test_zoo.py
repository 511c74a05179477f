"""The shipped models (cdi/zoo/models): manifests consistent, weights load, export writes PNGs."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from cdi import zoo
from cdi.zoo import digits, photos

EXPECTED = {
    "digits-memorised",
    "digits-hard",
    "digits-dit",
    "digits-latent",
    "digits-latent-class",
    "digits-flip",
    "photos-rgb",
}
FOLDERS = {"pixel": ("unet", "scheduler"), "latent": ("vae", "unet", "scheduler"),
           "dit": ("transformer", "vae", "scheduler")}
PIPELINES = {"pixel": "DDPMPipeline", "latent": "LDMPipeline", "dit": "DiTPipeline"}

MODELS = zoo.list_models()


def _unet_config(model: zoo.ZooModel) -> dict[str, object]:
    return json.loads((model.path / "unet" / "config.json").read_text())  # type: ignore[no-any-return]


def test_the_models_are_shipped() -> None:
    assert {m.name for m in MODELS} == EXPECTED


def test_get_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="digits-memorised"):
        zoo.get("no-such-model")
    assert zoo.get("digits-memorised").path == zoo.MODELS_DIR / "digits-memorised"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_manifest_is_consistent(model: zoo.ZooModel) -> None:
    m = model.manifest
    assert m["name"] == model.name == model.path.name
    source = zoo.DATASETS[model.dataset]
    assert m["dataset"] == model.dataset and m["image_channels"] == model.image_channels == source.CHANNELS
    assert model.family in FOLDERS and model.conditioning in ("none", "class")
    class_embeds = model.family != "dit" and bool(_unet_config(model).get("num_class_embeds"))
    assert (model.conditioning == "class") == (model.family == "dit" or class_embeds)
    members, held_out = set(model.members), set(model.held_out)
    assert list(model.members) == sorted(members) and list(model.held_out) == sorted(held_out)
    assert len(members) == len(model.members) and len(held_out) == len(model.held_out)
    assert not members & held_out
    assert all(0 <= i < source.count() for i in members | held_out)
    # Enough for the statistics study: 100 + 100 held-out images per null audit, 100 members.
    assert len(held_out) >= 300 and len(members) >= 100
    if model.name == "digits-memorised":
        assert len(members) == 100
    for key in ("steps", "batch_size", "lr", "seed", "parameters", "seconds"):
        assert key in m["training"]
    measured = m["measured"]
    assert measured["n_members"] == len(members) and measured["n_held_out"] == len(held_out)
    assert 0.0 <= measured["dl_auc_t100"] <= 1.0
    if model.dataset == "sklearn-digits":
        assert measured["dl_auc_t100"] > 0.5  # members have the lower loss
    if "features" in measured:
        aucs = measured["features"]["auc_members_lower"]
        assert len(aucs) == 26 and all(0.0 <= v <= 1.0 for v in aucs.values())
        assert measured["features"]["n_members"] == len(members)


def test_models_on_one_data_set_share_its_held_out_images() -> None:
    """Each data set has one held-out part, never seen by any model trained on that data set."""
    by_dataset: dict[str, set[tuple[int, ...]]] = {}
    for m in MODELS:
        by_dataset.setdefault(m.dataset, set()).add(m.held_out)
    assert by_dataset.keys() >= {"sklearn-digits", "sklearn-sample-photos"}
    assert all(len(parts) == 1 for parts in by_dataset.values()), "held-out parts differ within a data set"


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
    if model.family == "pixel":
        unet = _unet_config(model)
        assert unet["in_channels"] == unet["out_channels"] == model.image_channels
        assert unet["sample_size"] == model.image_size
    else:
        vae = json.loads((model.path / "vae" / "config.json").read_text())
        assert vae["in_channels"] == model.image_channels and vae["sample_size"] == model.image_size
        assert vae["scaling_factor"] > 0
    if model.family == "dit":
        tr = json.loads((model.path / "transformer" / "config.json").read_text())
        assert tr["out_channels"] == 2 * tr["in_channels"]  # learned sigma
        assert tr["num_embeds_ada_norm"] >= 10
    if model.family == "latent" and model.conditioning == "class":
        assert _unet_config(model)["num_class_embeds"] == 10


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_detected_as_the_manifest_says(model: zoo.ZooModel) -> None:
    """The adapters' family detection, by zoo name, agrees with the manifest."""
    from cdi.models import detect_family

    info = detect_family(model.name)
    assert info.family == model.family and info.conditioning == model.conditioning
    assert info.image_size == model.image_size and info.image_channels == model.image_channels
    if model.conditioning == "class":
        assert info.num_classes == 10


def test_latent_models_ship_one_autoencoder() -> None:
    """Every latent digit model encodes with the same autoencoder: identical float16 weights."""
    folders = [m.path / "vae" for m in MODELS if m.family != "pixel"]
    assert len(folders) >= 3
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert len({hashlib.sha256((f / name).read_bytes()).hexdigest() for f in folders}) == 1, name


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_loads_in_float32_and_runs(model: zoo.ZooModel) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

    f32 = torch.float32
    DDPMScheduler.from_pretrained(model.path, subfolder="scheduler")
    x = torch.zeros(2, model.image_channels, model.image_size, model.image_size)
    t = torch.tensor([100, 100])
    labels = torch.tensor([3, 7]) if model.conditioning == "class" else None
    with torch.no_grad():
        if model.family != "pixel":
            vae = AutoencoderKL.from_pretrained(model.path, subfolder="vae", torch_dtype=f32)
            assert all(p.dtype == f32 for p in vae.parameters())
            x = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        if model.family == "dit":
            net = DiTTransformer2DModel.from_pretrained(model.path, subfolder="transformer", torch_dtype=f32)
            out = net(x, timestep=t, class_labels=labels).sample
            assert out.shape[1] == 2 * x.shape[1]
        else:
            net = UNet2DModel.from_pretrained(model.path, subfolder="unet", torch_dtype=f32)
            out = net(x, t, class_labels=labels).sample
            assert out.shape == x.shape
            if labels is not None:  # the class changes the prediction: the embedding was trained
                other = net(x, t, class_labels=torch.tensor([0, 1])).sample
                assert not torch.allclose(out, other)
    assert all(p.dtype == f32 for p in net.parameters())
    assert torch.isfinite(out).all()


def test_memorised_model_has_lower_loss_on_members() -> None:
    """From the shipped weights: 20 members against 20 held-out digits, fixed noise."""
    import torch
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


@pytest.mark.parametrize("name", ["digits-memorised", "digits-dit", "digits-latent-class", "photos-rgb"])
def test_export_writes_readable_pngs(name: str, tmp_path) -> None:
    model = zoo.get(name)
    members, held_out = model.export(tmp_path, members=3, held_out=4)
    assert len(members) == 3 and len(held_out) == 4
    assert [p.parent.name for p in members] == ["published"] * 3
    assert [p.parent.name for p in held_out] == ["unpublished"] * 4
    assert [p.name for p in members] == [zoo.ZooModel.file_name(i, model.dataset) for i in model.members[:3]]
    mode = {1: "L", 3: "RGB"}[model.image_channels]
    for p, i in zip(members + held_out, list(model.members[:3]) + list(model.held_out[:4]), strict=True):
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (model.image_size, model.image_size)
            assert img.mode == mode
            assert np.array_equal(np.asarray(img), np.asarray(model.image(i)))
    labels = model.labels_for(model.members[:3])
    assert labels == {zoo.ZooModel.file_name(i, model.dataset): model.label(i) for i in model.members[:3]}
    assert (tmp_path / "labels.csv").is_file() == (model.conditioning == "class")
    with pytest.raises(ValueError):
        model.export(tmp_path / "too-many", members=len(model.members) + 1, held_out=1)


def test_file_names_follow_the_data_set() -> None:
    assert zoo.ZooModel.file_name(42) == "digit-0042.png"
    assert zoo.ZooModel.file_name(42, "sklearn-sample-photos") == "tile-0042.png"
    with pytest.raises(KeyError, match="sklearn-digits"):
        zoo.ZooModel.file_name(1, "no-such-data")


def test_photo_tiles_are_disjoint_crops_of_the_packaged_photographs() -> None:
    """2,080 non-overlapping 16x16 tiles of scikit-learn's two sample photos, rebuilt from package data."""
    from sklearn.datasets import load_sample_image

    assert photos.count() == 2 * 26 * 40
    covered = [np.zeros((427, 640), dtype=np.int64) for _ in photos.PHOTOS]
    for i in range(photos.count()):
        p, top, left, side = photos.box(i)
        assert p == photos.label(i) and side == photos.TILE == 16
        assert top >= 0 and top + side <= 427 and left >= 0 and left + side <= 640
        covered[p][top : top + side, left : left + side] += 1
    assert all(c.max() == 1 for c in covered)  # no pixel is in two tiles
    for i in (0, 1039, 1040, photos.count() - 1):
        p, top, left, side = photos.box(i)
        photo = load_sample_image(photos.PHOTOS[p])
        tile = photos.image(i)
        assert tile.mode == "RGB" and tile.size == (16, 16)
        assert np.array_equal(np.asarray(tile), photo[top : top + side, left : left + side])
    assert photos.image(7, 32).size == (32, 32)
    with pytest.raises(IndexError):
        photos.image(photos.count())


def test_photo_model_was_trained_on_these_pixels() -> None:
    """The decoded photographs are the ones the shipped RGB model was trained on."""
    recorded = zoo.get("photos-rgb").manifest["training"]["data"]["sha256"]
    assert photos.fingerprint() == recorded


def test_cli_lists_every_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    from cdi.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for m in MODELS:
        line = next(x for x in out.splitlines() if x.startswith(m.name + " "))
        assert m.family in line and f"{m.image_size}px" in line
        assert ("RGB" in line) == (m.image_channels == 3)
        assert f"{len(m.members)} members, {len(m.held_out)} held out" in out


def test_photo_model_signal_is_not_in_the_loss() -> None:
    """photos-rgb is the zoo's model whose per-image loss ranks members like anyone else."""
    measured = zoo.get("photos-rgb").manifest["measured"]
    assert abs(measured["dl_auc_t100"] - 0.5) < 0.05
    assert measured["mean_dl_members"] < measured["mean_dl_held_out"]
    aucs = measured["features"]["auc_members_lower"]
    assert max(abs(v - 0.5) for v in aucs.values()) >= 0.1  # SecMI carries it, reversed
