"""Models as they are published: a fine-tune shipped as its UNet or transformer alone beside a
base folder, hub models not yet downloaded, weight hashing (once per file, variants skipped)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdi.errors import InputError, MalformedModelError, ModelNotDownloadedError, PickledWeightsError
from cdi.features import FeatureExtractor
from cdi.features.extractor import ExtractionInput
from cdi.models import detect_family, load_model


@pytest.fixture(scope="module")
def tuned_sdxl(tmp_path_factory) -> Path:
    """An SDXL with the base's architecture and other weights in its UNet (a fine-tune)."""
    import tiny_models as tm

    return tm.build_sdxl(tmp_path_factory.mktemp("tuned") / "sdxl", seed=7)


def _items(n: int = 2) -> list[ExtractionInput]:
    rng = np.random.default_rng(0)
    return [ExtractionInput(f"{i:02d}" * 32, rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32), "a cat")
            for i in range(n)]


def _folder_with_unet(base: Path, tuned: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    shutil.copy(tuned / "unet" / "diffusion_pytorch_model.safetensors", dest / "unet")
    return dest


def test_sdxl_unet_file_gives_the_features_of_the_folder_with_that_unet(tiny_model_dirs, tuned_sdxl, tmp_path):
    base = tiny_model_dirs["sdxl"]
    file = tmp_path / "fine-tune-unet.safetensors"
    shutil.copy(tuned_sdxl / "unet" / "diffusion_pytorch_model.safetensors", file)
    whole = _folder_with_unet(base, tuned_sdxl, tmp_path / "whole")
    adapter = load_model(str(base), components={"unet": str(file)})
    folder = load_model(str(whole))
    ours = FeatureExtractor(adapter, seed=5).extract(_items())
    np.testing.assert_array_equal(ours, FeatureExtractor(folder, seed=5).extract(_items()))
    assert not np.array_equal(ours, FeatureExtractor(load_model(str(base)), seed=5).extract(_items()))
    # The identity names the file and the base's other weights, and differs from the base's.
    hashes = adapter.identity.weight_sha256
    assert hashes["unet:fine-tune-unet.safetensors"] == folder.identity.weight_sha256[
        "unet/diffusion_pytorch_model.safetensors"]
    assert {k for k in hashes if not k.startswith("unet")} == {
        k for k in folder.identity.weight_sha256 if not k.startswith("unet")}
    assert adapter.identity.digest != load_model(str(base)).identity.digest
    assert adapter.describe()["component_files"] == {"unet": str(file.resolve())}


def test_original_layout_unet_file_is_the_same_unet(tiny_model_dirs, tuned_sdxl, tmp_path):
    import tiny_models as tm
    from safetensors.torch import load_file, save_file

    full = tm.save_single_file(tuned_sdxl, tmp_path / "full.safetensors")
    unet_only = {k: v for k, v in load_file(str(full)).items() if k.startswith("model.diffusion_model.")}
    file = tmp_path / "unet-original.safetensors"
    save_file(unet_only, str(file))
    adapter = load_model(str(tiny_model_dirs["sdxl"]), components={"unet": str(file)})
    folder = load_model(str(tuned_sdxl))
    for (name, a), (_, b) in zip(adapter.unet.state_dict().items(), folder.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_component_files_are_checked(tiny_model_dirs, tuned_sdxl, tmp_path, monkeypatch):
    monkeypatch.delenv("CDI_ALLOW_PICKLE", raising=False)
    sdxl = str(tiny_model_dirs["sdxl"])
    with pytest.raises(InputError, match="takes no transformer file.*--unet"):
        detect_family(sdxl, components={"transformer": str(tuned_sdxl / "unet" / "diffusion_pytorch_model.bin")})
    with pytest.raises(InputError, match="pixel model takes no unet file"):
        detect_family(str(tiny_model_dirs["pixel"]), components={"unet": str(tmp_path)})
    with pytest.raises(Exception, match="does not exist"):
        detect_family(sdxl, components={"unet": str(tmp_path / "nope.safetensors")})
    # A UNet of another architecture does not fit the base's config.
    wrong = tmp_path / "sd15-unet.safetensors"
    shutil.copy(tiny_model_dirs["stable-diffusion"] / "unet" / "diffusion_pytorch_model.safetensors", wrong)
    with pytest.raises(MalformedModelError, match="cannot load it as the unet of"):
        load_model(sdxl, components={"unet": str(wrong)})
    pickled = tmp_path / "unet.bin"
    from safetensors.torch import load_file

    torch.save(load_file(str(tuned_sdxl / "unet" / "diffusion_pytorch_model.safetensors")), pickled)
    with pytest.raises(PickledWeightsError, match=r"unet\.bin"):
        load_model(sdxl, components={"unet": str(pickled)})


def test_flux_transformer_file(tiny_model_dirs, tmp_path):
    import tiny_models as tm

    tuned = tm.build_flux(tmp_path / "tuned", seed=3)
    file = tmp_path / "flux-ft.safetensors"
    shutil.copy(tuned / "transformer" / "diffusion_pytorch_model.safetensors", file)
    adapter = load_model(str(tiny_model_dirs["flux"]), components={"transformer": str(file)})
    folder = load_model(str(tuned))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = adapter.condition(["a cat"])
    with torch.inference_mode():
        torch.testing.assert_close(adapter.eps(z, 500, cond), folder.eps(z, 500, cond), rtol=0, atol=0)


# --- weight hashing -------------------------------------------------------------------------


def test_each_weight_file_is_hashed_once_and_variants_are_skipped(tiny_model_dirs, tmp_path, monkeypatch):
    import hashlib

    from cdi.models import loading

    d = shutil.copytree(tiny_model_dirs["stable-diffusion"], tmp_path / "m")
    unet = d / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet, d / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never loaded beside the safetensors")
    opened: list[str] = []
    real = hashlib.sha256

    def counting(*args):
        opened.append("x")
        return real(*args)

    monkeypatch.setattr(loading.hashlib, "sha256", counting)
    first = loading.weight_hashes(detect_family(str(d)))
    assert set(first) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                          "text_encoder/model.safetensors"}
    assert len(opened) == 3
    assert loading.weight_hashes(detect_family(str(d))) == first and len(opened) == 3
    # A file rewritten in place (new size or modification time) is hashed again.
    unet.write_bytes(unet.read_bytes() + b" ")
    changed = loading.weight_hashes(detect_family(str(d)))
    assert len(opened) == 4 and changed["unet/diffusion_pytorch_model.safetensors"] != first[
        "unet/diffusion_pytorch_model.safetensors"]


# --- hub models not downloaded --------------------------------------------------------------


def _hub_cache(model_dir: Path, cache: Path, repo: str, with_weights: bool) -> None:
    """``model_dir`` as the Hugging Face cache holds a hub repository's snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    ignore = None if with_weights else shutil.ignore_patterns("*.safetensors", "*.bin")
    shutil.copytree(model_dir, root / "snapshots" / commit, ignore=ignore)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("CDI_ALLOW_DOWNLOAD", raising=False)
    return tmp_path / "hub"


def test_hub_model_without_its_weights_says_how_to_download_them(tiny_model_dirs, offline_hub):
    _hub_cache(tiny_model_dirs["stable-diffusion"], offline_hub, "someone/tiny-sd", with_weights=False)
    info = detect_family("someone/tiny-sd")
    assert info.family == "stable-diffusion" and not info.reference.is_local
    with pytest.raises(ModelNotDownloadedError, match=r"hf download someone/tiny-sd.*CDI_ALLOW_DOWNLOAD=1"):
        load_model("someone/tiny-sd")


def test_hub_model_in_the_cache_loads_like_the_folder(tiny_model_dirs, offline_hub):
    _hub_cache(tiny_model_dirs["stable-diffusion"], offline_hub, "someone/tiny-sd", with_weights=True)
    hub = load_model("someone/tiny-sd")
    local = load_model(str(tiny_model_dirs["stable-diffusion"]))
    assert hub.identity.weight_sha256 == local.identity.weight_sha256


# --- one reference for a model published in parts ----------------------------------------------


def test_model_folder_names_a_base_and_its_unet_file(tiny_model_dirs, tuned_sdxl, tmp_path):
    import json

    folder = tmp_path / "fine-tune"
    folder.mkdir()
    shutil.copy(tuned_sdxl / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet.safetensors")
    (folder / "cdi_model.json").write_text(json.dumps({"base": str(tiny_model_dirs["sdxl"]),
                                                      "unet": "unet.safetensors"}))
    named = load_model(str(folder))
    direct = load_model(str(tiny_model_dirs["sdxl"]), components={"unet": str(folder / "unet.safetensors")})
    assert named.identity.digest == direct.identity.digest
    assert named.identity.reference.source == str(tiny_model_dirs["sdxl"].resolve())
    (folder / "cdi_model.json").write_text(json.dumps({"base": str(tiny_model_dirs["sdxl"]), "unet": "../x"}))
    with pytest.raises(MalformedModelError, match="'unet' must be a path inside the folder"):
        detect_family(str(folder))
    (folder / "cdi_model.json").write_text(json.dumps({"base": str(tiny_model_dirs["sdxl"])}))
    with pytest.raises(MalformedModelError, match="goes with a 'unet' or 'transformer' file"):
        detect_family(str(folder))


def test_model_folder_names_a_checkpoint_and_its_configs(tiny_model_dirs, tmp_path):
    import json

    import tiny_models as tm

    folder = tmp_path / "checkpoint"
    tm.config_folder(tiny_model_dirs["stable-diffusion"], folder / "configs")
    tm.save_single_file(tiny_model_dirs["stable-diffusion"], folder / "model.safetensors")
    (folder / "cdi_model.json").write_text(json.dumps({"checkpoint": "model.safetensors", "config": "configs"}))
    info = detect_family(str(folder))
    assert info.reference.is_single_file and info.family == "stable-diffusion"
    assert load_model(str(folder)).identity.digest == load_model(
        str(folder / "model.safetensors"), config=str(folder / "configs")).identity.digest


def test_flux_resolution(tiny_model_dirs, tmp_path):
    import json

    flux = tiny_model_dirs["flux"]
    at32 = load_model(str(flux), resolution=32)
    default = load_model(str(flux))
    assert (default.image_size, at32.image_size) == (16, 32)
    assert at32.describe()["flow_shift"]["image_seq_len"] == 64
    assert default.describe()["flow_shift"]["image_seq_len"] == 16
    assert at32.identity.digest != default.identity.digest  # their features differ: so do their cache keys
    assert load_model(str(flux), resolution=16).identity.digest == default.identity.digest
    with pytest.raises(InputError, match="multiple of 4"):
        load_model(str(flux), resolution=30)
    with pytest.raises(InputError, match="applies to Flux models"):
        load_model(str(tiny_model_dirs["sd3"]), resolution=32)
    folder = tmp_path / "flux-32"
    folder.mkdir()
    shutil.copy(flux / "transformer" / "diffusion_pytorch_model.safetensors", folder / "t.safetensors")
    (folder / "cdi_model.json").write_text(json.dumps({"base": str(flux), "transformer": "t.safetensors",
                                                      "resolution": 32}))
    assert detect_family(str(folder)).image_size == 32


def test_cli_audits_a_unet_file_against_its_base(tiny_model_dirs, tuned_sdxl, tmp_path):
    import csv

    from PIL import Image

    from cdi.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (60 * i, 90, 200)).save(images / f"{i}.png")
    file = tmp_path / "ft.safetensors"
    shutil.copy(tuned_sdxl / "unet" / "diffusion_pytorch_model.safetensors", file)
    args = ["features", "--model", str(tiny_model_dirs["sdxl"]), "--images", str(images), "--features",
            "gradient-free", "--seed", "1"]
    assert main([*args, "--unet", str(file), "--out", str(tmp_path / "file.csv")]) == 0
    whole = _folder_with_unet(tiny_model_dirs["sdxl"], tuned_sdxl, tmp_path / "whole")
    args[2] = str(whole)
    assert main([*args, "--out", str(tmp_path / "whole.csv")]) == 0
    rows = [list(csv.reader((tmp_path / n).open()))[1:] for n in ("file.csv", "whole.csv")]
    assert rows[0] == rows[1] and len(rows[0]) == 2
