"""Benchmark: feature extraction on large random-weight models, float32 against bfloat16.

Builds, from configs and with random weights (nothing downloaded), a DiT-XL/2 at 256 px, an
SD-1.5-sized UNet at 512 px and an SDXL-sized UNet at 1024 px (each with an SD-sized
KL autoencoder to encode the images), runs the default audit's features (``verdict``: what
its verdict reads) and all 26 on random images with each precision, and prints images/s,
network passes per image, peak memory, and each default audit's speed-up over all 26.

    python bench/gpu_throughput.py                      # on CUDA (see bench/gpu.sh)
    python bench/gpu_throughput.py --device cpu --tiny  # the same code on tiny configs

Each (model, precision) gets a warm-up batch (first-call costs, kernel selection) and then
timed batches until ``--seconds`` have passed (at least one), so the whole run stays bounded.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cdi.features import FeatureExtractor
from cdi.features.extractor import ExtractionInput
from cdi.models.base import DiffusionAdapter, ImageCondition, ModelIdentity, ModelReference
from cdi.models.schedule import NoiseSchedule


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # "dit", "sd" or "sdxl"
    image_size: int
    batch_size: int  # images per batch on the full-size model (a cap on the time)


SPECS = (
    Spec("dit-xl-2-256", "dit", 256, 64),
    Spec("sd15-unet-512", "sd", 512, 8),
    Spec("sdxl-unet-1024", "sdxl", 1024, 2),
)


def _vae(tiny: bool) -> Any:
    from diffusers import AutoencoderKL

    if tiny:
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=4)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2)


def _network(kind: str, tiny: bool) -> Any:
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    if kind == "dit":
        if tiny:
            return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
        return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                     num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    if kind == "sd":
        if tiny:
            return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    if tiny:
        return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                                    cross_attention_dim=32, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    use_linear_projection=True, norm_num_groups=4)
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    )


class RandomModel(DiffusionAdapter):
    """A latent diffusion model built from configs with random weights, seen as CDI sees it."""

    family = "random"

    def __init__(self, spec: Spec, device: torch.device, tiny: bool) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.schedule = NoiseSchedule.ddpm(torch.cumprod(1.0 - betas, dim=0), "epsilon")
        self.kind = spec.kind
        self.conditioning = "class" if spec.kind == "dit" else "text"
        self.image_channels = 3
        self.image_size = 16 if tiny else spec.image_size
        self.device = device
        self.dtype = torch.float32
        self.identity = ModelIdentity(ModelReference(f"random:{spec.name}"), "random")
        torch.manual_seed(0)
        with torch.device(device):  # random weights made where they run: no host copy
            self.autoencoder = _vae(tiny).eval().requires_grad_(False)
            self.net = _network(spec.kind, tiny).eval().requires_grad_(False)
        self.parameters = sum(p.numel() for p in self.net.parameters())
        cfg = self.net.config
        self.text_dim = getattr(cfg, "cross_attention_dim", None)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x.to(self.device)).latent_dist.mean * 0.18215

    def condition(self, conditions: list[ImageCondition],  # type: ignore[override]
                  original_sizes: Any = None) -> torch.Tensor:
        n = len(conditions)
        if self.kind == "dit":
            return torch.tensor([int(c or 0) % 1000 for c in conditions], device=self.device)
        g = torch.Generator(device="cpu").manual_seed(n)
        return torch.randn((n, 77, int(self.text_dim or 0)), generator=g).to(self.device)

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        steps = torch.as_tensor(t, device=self.device).expand(z_t.shape[0])
        if self.kind == "dit":
            out = self.net(z_t, timestep=steps, class_labels=cond).sample[:, : z_t.shape[1]]
        else:
            kw: dict[str, Any] = {}
            if self.kind == "sdxl":
                n, proj = z_t.shape[0], self.net.config.projection_class_embeddings_input_dim
                time_dim = self.net.config.addition_time_embed_dim
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.zeros((n, proj - 6 * time_dim), device=self.device),
                    "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=self.device).expand(n, 6),
                }
            out = self.net(z_t, steps, encoder_hidden_states=cond, **kw).sample
        return out.float()


def peak_memory(device: torch.device) -> float:
    """Peak memory in GiB: the CUDA allocator's peak, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model: RandomModel, spec: Spec, precision: str, batch_size: int | None, seconds: float,
            tiny: bool, features: str = "all") -> dict[str, float]:
    rng = np.random.default_rng(0)
    size = model.image_size
    cond: ImageCondition = 3 if spec.kind == "dit" else "a caption"

    def batch(k: int, n: int) -> list[ExtractionInput]:
        return [ExtractionInput(f"{k:032x}{i:032x}", rng.uniform(-1, 1, (3, size, size)).astype(np.float32), cond)
                for i in range(n)]

    ex = FeatureExtractor(model, feature_set=features, batch_size=batch_size, precision=precision, prefetch=False)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    n = ex.batch_size if batch_size is not None else 1
    ex.extract(batch(0, n))  # warm-up (and, with automatic sizing, the batch size)
    n = ex.batch_size
    done, passes, k = 0, 0, 1
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    before = ex.passes.forward + ex.passes.backward
    while True:
        ex.extract(batch(k, n))
        done += n
        k += 1
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    passes = ex.passes.forward + ex.passes.backward - before
    return {"images_per_s": done / elapsed, "passes": passes / done, "peak_gib": peak_memory(model.device),
            "batch": n, "images": done}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a check of this script, on any device)")
    ap.add_argument("--smoke", action="store_true", help="same as --device cpu --tiny --seconds 0")
    ap.add_argument("--models", nargs="+", default=[s.name for s in SPECS], choices=[s.name for s in SPECS])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--features", nargs="+", default=["verdict", "all"], choices=["verdict", "all", "gradient-free"],
                    help="feature sets to measure (default: the default audit's, and all 26)")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="timed seconds per model, precision and feature set (≥ 1 batch)")
    ap.add_argument("--auto-batch", action="store_true", help="size batches from free memory instead of the caps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.tiny, args.seconds = "cpu", True, 0.0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny to check the script", file=sys.stderr)
        return 2
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"{'model':16s} {'params':>7s} {'precision':9s} {'features':13s} {'batch':>5s} {'images/s':>9s} "
          f"{'passes/img':>10s} {'peak GiB':>8s}")
    for spec in (s for s in SPECS if s.name in args.models):
        model = RandomModel(spec, device, args.tiny)
        for precision in args.precisions:
            batch_size = None if args.auto_batch else (2 if args.tiny else spec.batch_size)
            rates = {}
            for features in args.features:
                r = measure(model, spec, precision, batch_size, args.seconds, args.tiny, features)
                rates[features] = r["images_per_s"]
                print(f"{spec.name:16s} {model.parameters / 1e6:6.1f}M {precision:9s} {features:13s} {r['batch']:5d} "
                      f"{r['images_per_s']:9.2f} {r['passes']:10.1f} {r['peak_gib']:8.2f}", flush=True)
            if "verdict" in rates and "all" in rates:
                print(f"{spec.name:16s} {'':7s} {precision:9s} default audit {rates['verdict'] / rates['all']:.2f}x "
                      "the images/s of all 26", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
