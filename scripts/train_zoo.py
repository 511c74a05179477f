"""Train the shipped test models on scikit-learn's digits (seeded, CPU, a few minutes each).

    python scripts/train_zoo.py [--only NAME ...] [--out cdi/zoo/models]

Models (see each SPEC's description):

- digits-memorised: pixel DDPM that memorised 100 digits (strong per-image signal);
- digits-hard: pixel DDPM trained on 500 digits for fewer epochs (weak per-image signal);
- digits-latent: a small KL autoencoder plus a UNet denoiser in its latent space;
- digits-dit: a class-conditional DiT (learned sigma) in the same latent space.

Members are the first N digits of one seeded permutation of all 1,797; the last 797 of it
are held out from every model (the autoencoder included), so held-out images are never
seen by any network. Weights are saved in float16; the manifest records the measured
members-vs-held-out AUC of the denoising loss, computed from the saved (float16) weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from sklearn.metrics import roc_auc_score

from cdi.images import to_model_array
from cdi.zoo import digits

SEED = 20251128
N_HELD_OUT = 797
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cdi" / "zoo" / "models"


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    description: str
    image_size: int
    n_members: int
    steps: int
    batch_size: int
    lr: float


SPECS = {
    s.name: s
    for s in (
        Spec("digits-memorised", "pixel", "pixel DDPM (1.1M parameters, 16x16) that memorised 100 digits: "
             "strong per-image membership signal", 16, 100, 1200, 50, 2e-3),
        Spec("digits-hard", "pixel", "pixel DDPM (1.1M parameters, 16x16) trained on 500 digits: weak "
             "per-image signal, detectable only over a set", 16, 500, 300, 50, 2e-3),
        Spec("digits-latent", "latent", "latent diffusion: KL autoencoder (32x32 -> 4x8x8) plus a UNet "
             "denoiser trained on 100 digits", 32, 100, 700, 50, 2e-3),
        Spec("digits-dit", "dit", "class-conditional DiT (learned sigma) in the KL latent space, trained "
             "on 100 digits; the class is the digit", 32, 100, 900, 50, 1e-3),
    )
}


def split() -> tuple[list[int], list[int]]:
    order = np.random.default_rng(SEED).permutation(digits.count()).tolist()
    return order[: digits.count() - N_HELD_OUT], sorted(order[-N_HELD_OUT:])


def pixels(indices: list[int], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([to_model_array(digits.image(i, size), size, 1) for i in indices]))


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


def pixel_unet(in_channels: int, size: int) -> UNet2DModel:
    return UNet2DModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def autoencoder() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def train_denoiser(net: torch.nn.Module, x0: torch.Tensor, spec: Spec, gen: torch.Generator,
                   labels: torch.Tensor | None = None) -> None:
    """Plain DDPM training: MSE between the noise and its prediction, uniform timesteps."""
    sched = scheduler()
    ab = sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=0.0)
    net.train()
    for step in range(spec.steps):
        idx = torch.randint(0, x0.shape[0], (spec.batch_size,), generator=gen)
        x = x0[idx]
        t = torch.randint(0, 1000, (spec.batch_size,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        if isinstance(net, DiTTransformer2DModel):
            out = net(xt, timestep=t, class_labels=labels[idx]).sample[:, : x.shape[1]]
        else:
            out = net(xt, t).sample
        loss = torch.nn.functional.mse_loss(out, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
    net.eval()


def train_autoencoder(x: torch.Tensor, gen: torch.Generator, steps: int = 600) -> AutoencoderKL:
    ae = autoencoder()
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    for step in range(steps):
        batch = x[torch.randint(0, x.shape[0], (64,), generator=gen)]
        post = ae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = ae.decode(z).sample
        kl = post.kl().mean() / batch[0].numel()
        loss = torch.nn.functional.mse_loss(rec, batch) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  autoencoder step {step:4d}  loss {loss.item():.4f}", flush=True)
    ae.eval()
    with torch.no_grad():
        std = float(ae.encode(x[:512]).latent_dist.mean.std())
    ae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return ae


def save_index(root: Path, pipeline: str, components: dict[str, tuple[str, str]]) -> None:
    index: dict[str, object] = {"_class_name": pipeline, "_diffusers_version": "0.30.0"}
    index.update({k: list(v) for k, v in components.items()})
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def measured_auc(root: Path, members: list[int], held_out: list[int], spec: Spec) -> dict[str, float]:
    """AUC (members lower) of the 5-draw denoising loss at t = 100, from the saved weights."""
    from cdi.features.extractor import ExtractionInput, FeatureExtractor
    from cdi.features.layout import FeatureSet
    from cdi.models import load_model

    adapter = load_model(str(root))
    items = []
    for i in members + held_out:
        x = to_model_array(digits.image(i, spec.image_size), spec.image_size, 1)
        cond = digits.label(i) if adapter.conditioning == "class" else None
        items.append(ExtractionInput(f"{i:064d}", x, cond))
    ex = FeatureExtractor(adapter, feature_set=FeatureSet.GRADIENT_FREE, seed=0, batch_size=100)
    dl = ex.extract(items)[:, 0]
    y = np.r_[np.ones(len(members)), np.zeros(len(held_out))]
    return {"dl_auc_t100": round(float(roc_auc_score(y, -dl)), 4), "n_members": len(members),
            "n_held_out": len(held_out)}


def to_half(root: Path) -> None:
    """Store every weight file in float16 (the zoo stays a few MB); loading upcasts."""
    from safetensors.torch import load_file, save_file

    for f in root.rglob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(tensors, f)


def build(spec: Spec, out: Path, shared: dict[str, AutoencoderKL]) -> None:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(spec.name.encode()) % 1000)
    pool, held_out = split()
    members = sorted(pool[: spec.n_members])
    root = out / spec.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    start = time.time()
    x = pixels(members, spec.image_size)
    print(f"{spec.name}: {len(members)} members, {spec.steps} steps", flush=True)

    if spec.family == "pixel":
        net: torch.nn.Module = pixel_unet(1, spec.image_size)
        train_denoiser(net, x, spec, gen)
        net.save_pretrained(root / "unet")
        comps = {"unet": ("diffusers", "UNet2DModel"), "scheduler": ("diffusers", "DDPMScheduler")}
        save_index(root, "DDPMPipeline", comps)
        conditioning = "none"
    else:
        if "ae" not in shared:
            # Trained on the pool only (never on held-out digits), once for both latent models.
            shared["ae"] = train_autoencoder(pixels(pool, 32), gen)
        ae = shared["ae"]
        with torch.no_grad():
            z = ae.encode(x).latent_dist.mean * ae.config.scaling_factor
        ae.save_pretrained(root / "vae")
        if spec.family == "latent":
            net = UNet2DModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 128), norm_num_groups=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            )
            train_denoiser(net, z, spec, gen)
            net.save_pretrained(root / "unet")
            comps = {"vae": ("diffusers", "AutoencoderKL"), "unet": ("diffusers", "UNet2DModel"),
                     "scheduler": ("diffusers", "DDPMScheduler")}
            save_index(root, "LDMPipeline", comps)
            conditioning = "none"
        else:
            net = DiTTransformer2DModel(
                num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
                num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
            )
            labels = torch.tensor([digits.label(i) for i in members])
            train_denoiser(net, z, spec, gen, labels)
            net.save_pretrained(root / "transformer")
            comps = {"transformer": ("diffusers", "DiTTransformer2DModel"),
                     "vae": ("diffusers", "AutoencoderKL"), "scheduler": ("diffusers", "DDPMScheduler")}
            save_index(root, "DiTPipeline", comps)
            conditioning = "class"
    scheduler().save_pretrained(root / "scheduler")
    seconds = round(time.time() - start, 1)
    to_half(root)
    measured = measured_auc(root, members, held_out, spec)
    manifest = {
        "name": spec.name,
        "description": spec.description,
        "family": spec.family,
        "dataset": "sklearn-digits",
        "image_size": spec.image_size,
        "image_channels": 1,
        "conditioning": conditioning,
        "members": members,
        "held_out": held_out,
        "training": {"steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr, "seed": SEED,
                     "parameters": sum(p.numel() for p in net.parameters()), "seconds": seconds,
                     "script": "scripts/train_zoo.py"},
        "measured": measured,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{spec.name}: {seconds} s, {measured}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train the shipped test models")
    ap.add_argument("--only", nargs="*", choices=sorted(SPECS), help="train only these")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    shared: dict[str, AutoencoderKL] = {}
    for name in args.only or list(SPECS):
        build(SPECS[name], args.out, shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
