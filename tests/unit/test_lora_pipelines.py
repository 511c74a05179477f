"""LoRAs load exactly as the diffusers pipelines load them: for each family and each format
a LoRA is published in (kohya's names, diffusers' names, a peft folder), ε̂ equals that of the
pipeline's own UNet or transformer after ``pipe.load_lora_weights`` + ``pipe.set_adapters``, at
two scales; a LoRA that only partly fits is refused, naming what does not fit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cdi.errors import UnsupportedModelError
from cdi.models import load_model

PIPELINES = {"stable-diffusion": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SCALES = (1.0, 0.6)


def _lora_modules(net: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in net.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS)}


def _denoiser(model_dir: Path) -> torch.nn.Module:
    import diffusers

    cls = diffusers.UNet2DConditionModel if (model_dir / "unet").is_dir() else None
    if cls is not None:
        return cls.from_pretrained(model_dir, subfolder="unet")
    config = (model_dir / "transformer" / "config.json").read_text()
    name = re.search(r'"_class_name": "(\w+)"', config)
    assert name is not None
    return getattr(diffusers, name.group(1)).from_pretrained(model_dir, subfolder="transformer")


def _peft_state(model_dir: Path, seed: int, alpha: int = 4) -> tuple[dict[str, torch.Tensor], object]:
    """A rank-2 LoRA (alpha ≠ rank) on the attention projections, in peft's names."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    net = _denoiser(model_dir)
    config = LoraConfig(r=2, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights="gaussian")
    inject_adapter_in_model(config, net)
    torch.manual_seed(seed)
    state = {k: (torch.randn_like(v) * 0.2 if "lora_B" in k else v) for k, v in get_peft_model_state_dict(net).items()}
    return state, config


def _sgm(name: str, layers: int) -> str:
    """SDXL's original (SGM) block name of a diffusers attention module, as kohya writes it."""
    down = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if down:
        return f"input_blocks.{1 + int(down[1]) * (layers + 1) + int(down[2])}.1.{down[3]}"
    up = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if up:
        return f"output_blocks.{int(up[1]) * (layers + 1) + int(up[2])}.1.{up[3]}"
    return name.replace("mid_block.attentions.0.", "middle_block.1.")


def _kohya_file(model_dir: Path, out: Path, seed: int, sgm: bool) -> Path:
    """A kohya-format LoRA (``lora_unet_…`` keys, lora_down/lora_up and an alpha per module)."""
    from safetensors.torch import save_file

    net = _denoiser(model_dir)
    layers = int(net.config.layers_per_block if isinstance(net.config.layers_per_block, int)
                 else net.config.layers_per_block[0])
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, m in _lora_modules(net).items():
        key = "lora_unet_" + (_sgm(name, layers) if sgm else name).replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.3
        state[f"{key}.alpha"] = torch.tensor(3.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


def _kohya_flux_file(model_dir: Path, out: Path, seed: int) -> Path:
    """A kohya-format Flux LoRA in the original (BFL) block names: a fused q/k/v projection
    and others that diffusers splits and renames."""
    import json

    from safetensors.torch import save_file

    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, fan_in, fan_out in (("double_blocks_0_img_attn_qkv", dim, 3 * dim),
                                  ("double_blocks_0_img_attn_proj", dim, dim),
                                  ("double_blocks_0_txt_attn_proj", dim, dim),
                                  ("double_blocks_0_img_mlp_0", dim, 4 * dim),
                                  ("single_blocks_0_linear2", 5 * dim, dim)):
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, fan_in, generator=g) * 0.3
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, 2, generator=g) * 0.3
        state[f"lora_unet_{name}.alpha"] = torch.tensor(3.0)
    save_file(state, str(out))
    return out


def _lora(kind: str, name: str, model_dir: Path, root: Path) -> tuple[Path, Path]:
    """(what ``--lora`` is given, the file ``pipe.load_lora_weights`` is given)."""
    import diffusers
    from safetensors.torch import save_file

    cls = getattr(diffusers, PIPELINES[name])
    layers = "unet" if (model_dir / "unet").is_dir() else "transformer"
    if kind == "kohya":
        file = _kohya_flux_file(model_dir, root / "kohya.safetensors", 3) if name == "flux" else \
            _kohya_file(model_dir, root / "kohya.safetensors", 3, sgm=name == "sdxl")
        return file, file
    state, config = _peft_state(model_dir, 2)
    if kind == "diffusers":
        cls.save_lora_weights(str(root / "diffusers"), **{f"{layers}_lora_layers": state,
                                                          f"{layers}_lora_adapter_metadata": config.to_dict()})
        file = root / "diffusers" / "pytorch_lora_weights.safetensors"
        return file, file
    folder = root / "peft"
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    config.save_pretrained(str(folder))
    # The pipelines take a peft adapter as one file that carries its config.
    cls.save_lora_weights(str(root / "as-file"), **{f"{layers}_lora_layers": state,
                                                    f"{layers}_lora_adapter_metadata": config.to_dict()})
    return folder, root / "as-file" / "pytorch_lora_weights.safetensors"


CASES = [("stable-diffusion", "kohya"), ("stable-diffusion", "diffusers"), ("stable-diffusion", "peft"),
         ("sdxl", "kohya"), ("sdxl", "diffusers"), ("sdxl", "peft"),
         ("sd3", "diffusers"), ("sd3", "peft"), ("flux", "kohya"), ("flux", "diffusers"), ("flux", "peft")]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_lora_equals_the_pipelines_load_lora_weights(tiny_model_dirs, tmp_path, name, kind):
    import diffusers

    model_dir = tiny_model_dirs[name]
    given, reference_file = _lora(kind, name, model_dir, tmp_path)
    base = load_model(str(model_dir))
    cond = base.condition(["a cat", ""])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    attr = "unet" if hasattr(base, "unet") else "transformer"
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(model_dir)
    pipe.load_lora_weights(str(reference_file), adapter_name="reference")
    with torch.inference_mode():
        plain = base.eps(z, 300, cond)
    for scale in SCALES:
        tuned = load_model(str(model_dir), lora=str(given), lora_scale=scale)
        pipe.set_adapters(["reference"], adapter_weights=[scale])
        setattr(base, attr, getattr(pipe, attr))  # the base adapter calls the pipeline's network
        with torch.inference_mode():
            ours, theirs = tuned.eps(z, 300, cond), base.eps(z, 300, cond)
        assert (ours - plain).abs().max() > 1e-3  # the LoRA does change the model
        assert (ours - theirs).abs().max() <= 1e-6, (scale, (ours - theirs).abs().max())


def test_kohya_sdxl_lora_adapts_every_module_it_names(tiny_model_dirs, tmp_path):
    file = _kohya_file(tiny_model_dirs["sdxl"], tmp_path / "k.safetensors", 1, sgm=True)
    tuned = load_model(str(tiny_model_dirs["sdxl"]), lora=str(file))
    adapted = {n for n, m in tuned.unet.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(_lora_modules(_denoiser(tiny_model_dirs["sdxl"])))


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_partial_lora_is_refused_naming_the_modules_it_lacks(tiny_model_dirs, tmp_path, name):
    import diffusers

    model_dir = tiny_model_dirs[name]
    state, _ = _peft_state(model_dir, 4)
    one = sorted({k.rsplit(".lora_", 1)[0] for k in state})[0]
    kept = {k: v for k, v in state.items() if k.startswith(one + ".lora_")}
    kept.update({k.replace(one, "no_such_block.to_q"): v.clone() for k, v in kept.items()})
    layers = "unet" if (model_dir / "unet").is_dir() else "transformer"
    getattr(diffusers, PIPELINES[name]).save_lora_weights(str(tmp_path), **{f"{layers}_lora_layers": kept})
    with pytest.raises(UnsupportedModelError, match=r"1 of its 2 modules .*no_such_block\.to_q"):
        load_model(str(model_dir), lora=str(tmp_path / "pytorch_lora_weights.safetensors"))
    # The peft folder form is held to the same rule.
    from safetensors.torch import save_file

    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(kept, str(folder / "adapter_model.safetensors"))
    from peft import LoraConfig

    LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]).save_pretrained(str(folder))
    with pytest.raises(UnsupportedModelError, match="no_such_block"):
        load_model(str(model_dir), lora=str(folder))


def _with_text_encoder(file: Path, seed: int) -> Path:
    """``file`` plus kohya-named LoRA weights on the (16-wide) CLIP text encoder's MLPs."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    state = load_file(str(file))
    for name, fan_in, fan_out in (("lora_te_text_model_encoder_layers_0_mlp_fc2", 32, 16),
                                  ("lora_te_text_model_encoder_layers_1_mlp_fc1", 16, 32)):
        state[f"{name}.lora_down.weight"] = torch.randn(2, fan_in, generator=g) * 0.5
        state[f"{name}.lora_up.weight"] = torch.randn(fan_out, 2, generator=g) * 0.5
        state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(file))
    return file


def test_text_encoder_lora_equals_the_pipelines(tiny_model_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = tiny_model_dirs["stable-diffusion"]
    file = _with_text_encoder(_kohya_file(sd, tmp_path / "k.safetensors", 1, sgm=False), 2)
    base = load_model(str(sd))
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.load_lora_weights(str(file), adapter_name="reference")
    base.unet, base.text_encoder = pipe.unet, pipe.text_encoder
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = load_model(str(sd)).condition(["a cat", ""])
    for scale in SCALES:
        tuned = load_model(str(sd), lora=str(file), lora_scale=scale)
        pipe.set_adapters(["reference"], adapter_weights=[scale])
        ours, theirs = tuned.condition(["a cat", ""]), base.condition(["a cat", ""])
        assert (ours - plain).abs().max() > 1e-3  # the text encoder is adapted
        assert (ours - theirs).abs().max() <= 1e-6
        with torch.inference_mode():
            assert (tuned.eps(z, 300, ours) - base.eps(z, 300, theirs)).abs().max() <= 1e-6


def test_text_encoder_lora_for_an_encoder_the_pipeline_skips_is_refused(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    file, _ = _lora("diffusers", "flux", tiny_model_dirs["flux"], tmp_path)
    state = load_file(str(file))
    state["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = torch.zeros(2, 32)
    state["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"] = torch.zeros(16, 2)
    save_file(state, str(file))
    with pytest.raises(UnsupportedModelError, match=r"2 of its weights name no module of its transformer, "
                                                    r"text_encoder.*text_encoder_2\."):
        load_model(str(tiny_model_dirs["flux"]), lora=str(file))


def test_peft_folder_saved_by_a_peft_model_is_the_same_lora(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tiny_model_dirs["sdxl"]
    folder, _ = _lora("peft", "sdxl", model_dir, tmp_path)
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    (wrapped / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file({f"base_model.model.{k}": v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()},
              str(wrapped / "adapter_model.safetensors"))
    a, b = load_model(str(model_dir), lora=str(folder)), load_model(str(model_dir), lora=str(wrapped))
    cond = a.condition(["a cat"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(a.eps(z, 300, cond), b.eps(z, 300, cond))


def test_lora_file_with_weights_outside_the_denoiser_is_refused(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    file, _ = _lora("diffusers", "flux", tiny_model_dirs["flux"], tmp_path)
    state = load_file(str(file))
    key = next(iter(state))
    state["single_transformer_blocks.0.attn.to_q.lora_A.weight"] = state[key].clone()
    save_file(state, str(file))
    with pytest.raises(UnsupportedModelError, match=r"1 of its weights name no module of its transformer"):
        load_model(str(tiny_model_dirs["flux"]), lora=str(file))


def test_text_encoder_lora_naming_a_missing_layer_is_refused(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = tiny_model_dirs["stable-diffusion"]
    file = _with_text_encoder(_kohya_file(sd, tmp_path / "k.safetensors", 1, sgm=False), 2)
    state = load_file(str(file))
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):  # the tiny encoder has two layers
        key = f"lora_te_text_model_encoder_layers_1_mlp_fc1.{part}"
        state[key.replace("layers_1", "layers_7")] = state[key].clone()
    save_file(state, str(file))
    with pytest.raises(UnsupportedModelError, match=r"1 of its \d+ modules are not in the CLIPTextModel "
                                                    r"\(.*layers\.7\.mlp\.fc1"):
        load_model(str(sd), lora=str(file))


def test_text_encoder_weights_the_pipeline_would_drop_are_refused(tiny_model_dirs, tmp_path):
    """diffusers (0.42) turns kohya's text-encoder attention names into an older naming it then
    leaves unconverted: beside MLP weights, the pipeline applies the MLP part alone (alone, it
    cannot read the file at all)."""
    from safetensors.torch import load_file, save_file

    sd = tiny_model_dirs["stable-diffusion"]
    file = _with_text_encoder(_kohya_file(sd, tmp_path / "k.safetensors", 1, sgm=False), 2)
    state = load_file(str(file))
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    state.update({f"{name}.lora_down.weight": torch.ones(2, 16), f"{name}.lora_up.weight": torch.ones(16, 2),
                  f"{name}.alpha": torch.tensor(2.0)})
    save_file(state, str(file))
    with pytest.raises(UnsupportedModelError, match=r"not in the CLIPTextModel \(.*layers\.0\.self_attn"):
        load_model(str(sd), lora=str(file))
