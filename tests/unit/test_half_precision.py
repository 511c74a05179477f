"""Half precision as the pipelines run it: each family's ε̂ and latents in float16 and
bfloat16 equal the pipeline's own networks loaded in that dtype and called as the pipeline
calls them (SDXL's autoencoder upcast to float32 where its config says ``force_upcast``; SD3's
timestep kept in float32; Flux's cast to the latents' dtype before it is divided by 1000)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdi.models import load_model

PIPELINES = {"stable-diffusion": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _pipeline_latents(pipe, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    vae = pipe.vae
    x = x.to(dtype)
    if name == "sdxl" and vae.config.force_upcast:  # StableDiffusionXLImg2ImgPipeline.prepare_latents
        vae, x = vae.to(torch.float32), x.float()
    z = vae.encode(x).latent_dist.mean.to(dtype)
    if name in ("sd3", "flux"):
        return (z - vae.config.shift_factor) * vae.config.scaling_factor
    return z * vae.config.scaling_factor


def _pipeline_eps(pipe, name: str, adapter, z: torch.Tensor, t: int, captions: list[str],
                  dtype: torch.dtype) -> torch.Tensor:
    b = z.shape[0]
    zt = z.to(dtype)
    if name == "stable-diffusion":
        states, _ = pipe.encode_prompt(captions, "cpu", 1, False)
        return pipe.unet(zt, torch.full((b,), t), encoder_hidden_states=states).sample.float()
    if name == "sdxl":
        states, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=states.dtype,
                                     text_encoder_projection_dim=8).repeat(b, 1)
        return pipe.unet(zt, torch.full((b,), t), encoder_hidden_states=states,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()
    sigma = adapter.schedule.s[t].to(torch.float32)
    if name == "sd3":
        states, _, pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=256)
        v = pipe.transformer(hidden_states=zt, encoder_hidden_states=states, pooled_projections=pooled,
                             timestep=(sigma * 1000).expand(b)).sample
    else:
        states, pooled, text_ids = pipe.encode_prompt(captions, None, device="cpu", max_sequence_length=512)
        packed = pipe._pack_latents(zt, b, 4, 8, 8)
        ids = pipe._prepare_latent_image_ids(b, 4, 4, "cpu", dtype)
        step = (sigma * 1000).expand(b).to(dtype)
        v = pipe.transformer(hidden_states=packed, timestep=step / 1000, guidance=torch.full((b,), 3.5),
                             pooled_projections=pooled, encoder_hidden_states=states, txt_ids=text_ids,
                             img_ids=ids).sample
        v = pipe._unpack_latents(v, 16, 16, pipe.vae_scale_factor)
    return (z + (1 - sigma) * v.float())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PIPELINES))
def test_half_precision_is_the_pipelines(tiny_model_dirs, name, dtype):
    import diffusers

    dt = DTYPES[dtype]
    adapter = load_model(str(tiny_model_dirs[name]), dtype=dtype)
    loaded = getattr(diffusers, PIPELINES[name]).from_pretrained(tiny_model_dirs[name], torch_dtype=dt)
    # Every network is loaded in the dtype the pipeline loads it in, but SDXL's autoencoder,
    # which its pipeline moves to float32 before encoding (force_upcast).
    pipe = adapter.as_pipeline()
    for role, module in loaded.components.items():
        if isinstance(module, torch.nn.Module):
            expected = torch.float32 if (name, role) == ("sdxl", "vae") else module.dtype
            assert pipe.components[role].dtype == expected == (torch.float32 if role == "vae" and name == "sdxl"
                                                               else dt), role
    # The pipeline's own calls, on the adapter's modules (CPU kernels round half precision
    # differently from one copy of a weight to another, so the modules must be the same).
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    captions = ["a cat", "the sea"]
    with torch.inference_mode():
        ours_z0 = adapter.encode(x)
        theirs_z0 = _pipeline_latents(pipe, name, x, dt).float()
        ours = adapter.eps(z.to(dt).float(), 300, adapter.condition(captions))
        theirs = _pipeline_eps(pipe, name, adapter, z.to(dt).float(), 300, captions, dt)
    assert ours_z0.dtype == torch.float32 and torch.isfinite(ours_z0).all()
    torch.testing.assert_close(ours_z0, theirs_z0, rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_sdxl_float16_features_are_finite_with_a_float32_autoencoder(tiny_model_dirs):
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput

    adapter = load_model(str(tiny_model_dirs["sdxl"]), dtype="float16")
    assert adapter.unet.dtype == torch.float16 and adapter.autoencoder.dtype == torch.float32
    assert adapter.describe()["dtype"] == "float16"
    rng = np.random.default_rng(0)
    items = [ExtractionInput(f"{i:02d}" * 32, rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32), "a cat")
             for i in range(2)]
    features = FeatureExtractor(adapter, seed=5).extract(items)
    assert np.isfinite(features).all()
    full = FeatureExtractor(load_model(str(tiny_model_dirs["sdxl"])), seed=5).extract(items)
    assert not np.array_equal(features, full)  # the UNet did run in float16


def test_sdxl_single_file_in_float16_upcasts_its_autoencoder(tiny_model_dirs, tmp_path):
    import tiny_models as tm

    file = tm.save_single_file(tiny_model_dirs["sdxl"], tmp_path / "sdxl.safetensors")
    adapter = load_model(str(file), config=str(tm.config_folder(tiny_model_dirs["sdxl"], tmp_path / "configs")),
                         dtype="float16")
    assert adapter.unet.dtype == torch.float16 and adapter.autoencoder.dtype == torch.float32
    with torch.inference_mode():
        assert torch.isfinite(adapter.encode(torch.zeros(1, 3, 16, 16))).all()
