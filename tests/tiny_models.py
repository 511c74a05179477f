"""Tiny random-weight models of every supported family, built from configs (seeded).

They exercise each adapter's real forward passes in a few milliseconds. The Stable
Diffusion-style model gets a CLIP tokenizer whose vocabulary this module writes itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _save_index(root: Path, pipeline: str, components: dict[str, tuple[str, str]]) -> None:
    index = {"_class_name": pipeline, "_diffusers_version": "0.30.0"}
    index.update({name: [lib, cls] for name, (lib, cls) in components.items()})
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def _scheduler(root: Path, **overrides: object) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000, **overrides).save_pretrained(root / "scheduler")


def _small_unet2d(in_channels: int, sample_size: int, **kw: object):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kw,
    )


def _small_kl(in_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )


def build_pixel(root: Path, seed: int = 0, channels: int = 3, size: int = 16,
                num_classes: int | None = None) -> Path:
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    kw = {"num_class_embeds": num_classes} if num_classes else {}
    _small_unet2d(channels, size, **kw).save_pretrained(root / "unet")
    _scheduler(root)
    _save_index(root, "DDPMPipeline", {"unet": ("diffusers", "UNet2DModel"),
                                       "scheduler": ("diffusers", "DDPMScheduler")})
    return root


def build_latent(root: Path, seed: int = 0, vq: bool = False, channels: int = 3) -> Path:
    from diffusers import VQModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    if vq:
        ae = VQModel(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=3,
            num_vq_embeddings=32,
            norm_num_groups=4,
            sample_size=16,
        )
        ae.save_pretrained(root / "vqvae")
        latent_channels, folder, cls = 3, "vqvae", "VQModel"
    else:
        _small_kl(channels).save_pretrained(root / "vae")
        latent_channels, folder, cls = 4, "vae", "AutoencoderKL"
    _small_unet2d(latent_channels, 8).save_pretrained(root / "unet")
    _scheduler(root)
    _save_index(root, "LDMPipeline", {folder: ("diffusers", cls), "unet": ("diffusers", "UNet2DModel"),
                                      "scheduler": ("diffusers", "DDPMScheduler")})
    return root


def build_dit(root: Path, seed: int = 0, channels: int = 3, num_classes: int = 10) -> Path:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    _small_kl(channels).save_pretrained(root / "vae")
    DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: [ε, variance]
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=4,
    ).save_pretrained(root / "transformer")
    _scheduler(root)
    _save_index(root, "DiTPipeline", {"transformer": ("diffusers", "DiTTransformer2DModel"),
                                      "vae": ("diffusers", "AutoencoderKL"),
                                      "scheduler": ("diffusers", "DDIMScheduler")})
    return root


def _write_clip_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (printable ASCII, a few merges)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder)


def build_stable_diffusion(root: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write_clip_tokenizer(root / "tokenizer")
    vocab_size = len(CLIPTokenizer.from_pretrained(root / "tokenizer"))
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
        )
    ).save_pretrained(root / "text_encoder")
    _small_kl(3).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(root / "unet")
    _scheduler(root, prediction_type=prediction_type)
    _save_index(root, "StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "PNDMScheduler"),
    })
    return root


def _write_t5_tokenizer(folder: Path) -> None:
    """A character-level T5 (Unigram) tokenizer: printable ASCII and the word-start mark."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0, model_max_length=16).save_pretrained(folder)


def _clip_text(root: Path, folder: str, tokenizer: str, hidden: int, projection: int | None = None) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_size = len(CLIPTokenizer.from_pretrained(root / tokenizer))
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, projection_dim=projection or hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    model.save_pretrained(root / folder)


def _t5_text(root: Path, folder: str, tokenizer: str, d_model: int) -> None:
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab_size = len(T5TokenizerFast.from_pretrained(root / tokenizer))
    T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).save_pretrained(root / folder)


def _flow_vae():
    vae = _small_kl(3)
    vae.register_to_config(shift_factor=0.1)
    return vae


def build_sdxl(root: Path, seed: int = 0) -> Path:
    """Two CLIP encoders (16 + 24 wide states, an 8-wide projected pooled vector) and a UNet
    with SDXL's size conditioning (``addition_embed_type="text_time"``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write_clip_tokenizer(root / "tokenizer")
    _write_clip_tokenizer(root / "tokenizer_2")
    _clip_text(root, "text_encoder", "tokenizer", 16)
    # Widths differ, as in SDXL (768 and 1280): single-file loading tells the encoders apart by it.
    _clip_text(root, "text_encoder_2", "tokenizer_2", 24, projection=8)
    _small_kl(3).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=40, attention_head_dim=2, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    ).save_pretrained(root / "unet")
    _scheduler(root)
    _save_index(root, "StableDiffusionXLPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "EulerDiscreteScheduler"),
    })
    return root


def build_sd3(root: Path, seed: int = 0, shift: float = 3.0) -> Path:
    """Two projected CLIP encoders (8-wide pooled each), a 32-wide T5 and an MMDiT."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write_clip_tokenizer(root / "tokenizer")
    _write_clip_tokenizer(root / "tokenizer_2")
    _write_t5_tokenizer(root / "tokenizer_3")
    _clip_text(root, "text_encoder", "tokenizer", 16, projection=8)
    _clip_text(root, "text_encoder_2", "tokenizer_2", 16, projection=8)
    _t5_text(root, "text_encoder_3", "tokenizer_3", 32)
    _flow_vae().save_pretrained(root / "vae")
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(root / "scheduler")
    _save_index(root, "StableDiffusion3Pipeline", {
        "transformer": ("diffusers", "SD3Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    })
    return root


def build_flux(root: Path, seed: int = 0, guidance: bool = True, sample_size: int | None = 8) -> Path:
    """A CLIP encoder (its pooled output), a 32-wide T5 and a Flux transformer on 2×2-packed
    latents; the scheduler shifts σ with the image's sequence length, as FLUX.1-dev's does.

    Flux configs name no resolution; ``sample_size`` (latents) is written into the
    transformer's config so that the tiny model audits 16-pixel images.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write_clip_tokenizer(root / "tokenizer")
    _write_t5_tokenizer(root / "tokenizer_2")
    _clip_text(root, "text_encoder", "tokenizer", 16)
    _t5_text(root, "text_encoder_2", "tokenizer_2", 32)
    _flow_vae().save_pretrained(root / "vae")
    FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    ).save_pretrained(root / "transformer")
    if sample_size is not None:
        path = root / "transformer" / "config.json"
        config = json.loads(path.read_text())
        config["sample_size"] = sample_size
        path.write_text(json.dumps(config, indent=2))
    FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(root / "scheduler")
    _save_index(root, "FluxPipeline", {
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    })
    return root


# --- single-file checkpoints ---------------------------------------------------------------


def _ldm_resnet(rest: str) -> str:
    for new, old in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _ldm_unet_key(key: str, per_block: int, up_has_attention: list[bool]) -> str:
    """The original (CompVis) name of a diffusers UNet2DConditionModel weight."""
    import re

    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in fixed:
        return fixed[key]
    n = per_block
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{(n + 1) * i + j + 1}.0.{_ldm_resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{(n + 1) * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(n + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_ldm_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{(n + 1) * int(m[1]) + int(m[2])}.0.{_ldm_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{(n + 1) * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{(n + 1) * i + n}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(key)


def _ldm_vae_key(key: str, num_up: int) -> tuple[str, bool]:
    """The original name of a diffusers AutoencoderKL weight, and whether it is an attention
    projection (stored there as a 1×1 convolution)."""
    import re

    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key], False
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+?)(?:\.0)?\.(weight|bias)", key):
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        return f"{m[1]}.mid.attn_1.{names[m[2]]}.{m[3]}", m[2] != "group_norm"
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}", False
    raise KeyError(key)


def _open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection's weights in OpenCLIP's names (SDXL's second
    encoder in original checkpoints): q, k, v fused into one in_proj, the projection a matrix."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        simple = {"embeddings.position_embedding.weight": "positional_embedding",
                  "embeddings.token_embedding.weight": "token_embedding.weight",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
            base = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                fused.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
                continue
            for new, old in (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                rest = rest.replace(new, old)
            out[base + rest] = value
        else:
            raise KeyError(key)
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def save_single_file(model_dir: Path, path: Path, text_encoders: bool = True) -> Path:
    """A tiny Stable Diffusion 1.x or SDXL folder as one original-layout checkpoint, as
    published on model-sharing sites (``model.diffusion_model.*``, ``first_stage_model.*``,
    and the text encoders under ``cond_stage_model.`` or SDXL's ``conditioner.embedders.``).
    Written from the diffusers weights by inverting the names diffusers' single-file loader
    converts. Without ``text_encoders`` the file holds the UNet and autoencoder only."""
    from safetensors.torch import load_file, save_file

    sdxl = json.loads((model_dir / "model_index.json").read_text())["_class_name"].startswith("StableDiffusionXL")
    state: dict[str, torch.Tensor] = {}
    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    up_attention = ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    for key, value in load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors").items():
        state["model.diffusion_model." + _ldm_unet_key(key, unet_cfg["layers_per_block"], up_attention)] = value
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    for key, value in load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors").items():
        name, conv = _ldm_vae_key(key, len(vae_cfg["up_block_types"]))
        state["first_stage_model." + name] = value[:, :, None, None] if conv and value.dim() == 2 else value
    clip = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in (load_file(model_dir / "text_encoder" / "model.safetensors") if text_encoders else {}).items():
        state[clip + (key if key.startswith("text_model.") else "text_model." + key)] = value
    if sdxl and text_encoders:
        second = _open_clip_state(load_file(model_dir / "text_encoder_2" / "model.safetensors"))
        state.update({"conditioner.embedders.1.model." + k: v for k, v in second.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def config_folder(model_dir: Path, dest: Path) -> Path:
    """The model's folder without any weight file: what ``--config`` points at."""
    import shutil

    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest
