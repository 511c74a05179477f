"""Train the shipped test models on image data inside scikit-learn (seeded, CPU, minutes each).

    python scripts/train_zoo.py [--only NAME ...] [--out cdi/zoo/models] [--threads 2]

Models (see each Spec's description):

- digits-memorised: pixel DDPM that memorised 100 digits (strong per-image signal);
- digits-hard: pixel DDPM trained on 500 digits for 80 epochs (weak per-image signal);
- digits-dit: a class-conditional DiT (learned sigma: 2×C output channels) in the latent
  space of a small KL autoencoder; the class is the digit. Only the ε half of its output is
  trained (plain MSE, no variational-bound term), so its variance channels are untrained;
  CDI reads the ε half only;
- digits-latent: the same autoencoder plus a UNet denoiser in its latent space;
- digits-latent-class: the same autoencoder plus a class-conditional UNet (a learned
  embedding of the digit added to the timestep embedding) on 150 digits;
- digits-flip: a smaller pixel DDPM trained on 150 digits with random horizontal flips, so
  each member is seen as itself only half of the time (augmentation dilutes its signal);
- photos-rgb: an RGB pixel DDPM on 100 16×16 tiles of scikit-learn's two sample
  photographs (cdi/zoo/photos.py), with digits-memorised's network and about its
  schedule; the mean loss is lower on members but its rank is not (AUC ≈ 0.5): how hard
  a tile is to denoise varies more between tiles than membership changes it.

Data. Per data set, one seeded permutation of its images: its last images are held out
from every model (the autoencoder included), so a held-out image was never seen by any
network; its first 1,000 are the pool, and a model's members are the first N of the pool.
Digits: 1,797 images, 797 held out. Photo tiles: 2,080 non-overlapping tiles, 1,080 held out
(no tile shares a pixel with another). The one autoencoder of the latent digit models is
trained on the whole digit pool (1,000 digits, never a held-out one) and saved, identical,
in every latent model folder; digits-latent-class is trained on the latents of that saved
float16 copy, which it reloads from digits-latent when the run does not train the
autoencoder (the same weights either way).

Training: AdamW, 20-step linear warm-up then cosine decay to 0, uniform timesteps of a
1000-step linear-beta DDPM schedule, MSE on ε; a flip model mirrors each drawn image
left-right with probability 1/2.

Weights are saved in float16 safetensors (the zoo stays a few MB). After saving, every model
is reloaded through diffusers in float32 and its members-vs-held-out AUC of the denoising
loss (t = 100, mean of 5 noise draws of ‖ε̂ − ε‖₂, noise seeded per image) is measured on
all members and all held-out images; that number goes into the manifest
(``scripts/measure_zoo.py`` adds the AUC of each of the 26 features).

Threads: OpenMP's default busy-waiting makes multi-threaded torch 20× slower when another
process shares the cores, so OMP_WAIT_POLICY=PASSIVE is set before torch is imported.
Results are bit-for-bit reproducible for a given ``--threads`` (recorded in the manifest:
digits-latent-class and digits-flip were trained with ``--threads 1``, the others with 2).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cdi.images import to_model_array  # noqa: E402
from cdi.zoo import DATASETS  # noqa: E402

SEED = 20251128
N_POOL = 1000  # the first 1,000 of each permutation; the rest is held out from everything
#: The seed of each data set's permutation (the digits' is the first one, kept as it was).
SPLIT_SEEDS = {"sklearn-digits": SEED, "sklearn-sample-photos": SEED + 100}
MEASURE_SEED = 0
MEASURE_T = 100
MEASURE_DRAWS = 5
DEFAULT_OUT = ROOT / "cdi" / "zoo" / "models"
#: A model folder whose vae/ holds the saved float16 autoencoder.
SAVED_AUTOENCODER = "digits-latent"


@dataclass(frozen=True)
class Spec:
    name: str
    family: str  # pixel | latent | dit
    description: str
    image_size: int
    n_members: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    dataset: str = "sklearn-digits"
    #: Mirror each drawn training image left-right with probability 1/2.
    flip: bool = False
    #: Class-conditional on this many classes (the image's label); 0: unconditional.
    classes: int = 0
    #: Channels of the pixel UNet's three levels.
    widths: tuple[int, int, int] = (32, 64, 64)
    #: Train on latents of the autoencoder's float16 copy (the one every latent model ships),
    #: so the model can be retrained from the saved autoencoder without retraining that.
    half_autoencoder: bool = False

    @property
    def channels(self) -> int:
        return int(DATASETS[self.dataset].CHANNELS)

    @property
    def conditioning(self) -> str:
        return "class" if self.family == "dit" or self.classes else "none"


@dataclass(frozen=True)
class AutoencoderSpec:
    image_size: int = 32
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-4
    seed: int = SEED + 7


AE = AutoencoderSpec()

SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("digits-memorised", "pixel", "pixel DDPM (1.1M parameters, 16x16) that memorised 100 digits: "
             "strong per-image membership signal", 16, 100, 700, 50, 2e-3, SEED + 1),
        Spec("digits-hard", "pixel", "pixel DDPM (1.1M parameters, 16x16) trained on 500 digits for 80 epochs: "
             "weak per-image signal, detectable only over a set", 16, 500, 800, 50, 2e-3, SEED + 2),
        Spec("digits-dit", "dit", "class-conditional DiT (0.8M parameters, learned sigma; 32x32 digits as 4x8x8 "
             "KL latents) trained on 100 digits; the class is the digit", 32, 100, 1500, 50, 2e-3, SEED + 3),
        Spec("digits-latent", "latent", "latent diffusion (0.7M-parameter UNet on 4x8x8 KL latents of 32x32 "
             "digits) trained on 100 digits", 32, 100, 700, 50, 2e-3, SEED + 4),
        Spec("digits-latent-class", "latent", "class-conditional latent diffusion (0.7M-parameter UNet with a "
             "learned class embedding, on 4x8x8 KL latents of 32x32 digits) trained on 150 digits; the class is "
             "the digit", 32, 150, 1000, 32, 2e-3, SEED + 5, classes=10, half_autoencoder=True),
        Spec("digits-flip", "pixel", "pixel DDPM (0.28M parameters, 16x16) trained on 150 digits with random "
             "horizontal flips: each member is seen mirrored half of the time", 16, 150, 1200, 32, 2e-3, SEED + 6,
             flip=True, widths=(16, 32, 32)),
        Spec("photos-rgb", "pixel", "RGB pixel DDPM (1.1M parameters) trained on 100 16x16 tiles of "
             "scikit-learn's two sample photographs: the per-image loss carries almost no membership signal",
             16, 100, 800, 50, 2e-3, SEED + 8,
             dataset="sklearn-sample-photos"),
    )
}


# --------------------------------------------------------------------------- data


def split(dataset: str = "sklearn-digits") -> tuple[list[int], list[int]]:
    """(pool in permutation order, held-out sorted): disjoint, together every image of ``dataset``."""
    order = np.random.default_rng(SPLIT_SEEDS[dataset]).permutation(DATASETS[dataset].count()).tolist()
    return order[:N_POOL], sorted(order[N_POOL:])


def members_of(spec: Spec) -> list[int]:
    return sorted(split(spec.dataset)[0][: spec.n_members])


def pixels(indices: list[int], size: int, dataset: str = "sklearn-digits") -> torch.Tensor:
    """The exact model input of the feature extractor: ``to_model_array`` of the rendered image."""
    source = DATASETS[dataset]
    return torch.from_numpy(np.stack([to_model_array(source.image(i, size), size, source.CHANNELS)
                                      for i in indices]))


def labels_of(indices: list[int], dataset: str = "sklearn-digits") -> torch.Tensor:
    return torch.tensor([DATASETS[dataset].label(i) for i in indices], dtype=torch.long)


# --------------------------------------------------------------------------- networks


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


def pixel_unet(size: int, channels: int = 1, widths: tuple[int, int, int] = (32, 64, 64)) -> UNet2DModel:
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=widths, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def latent_unet(classes: int = 0) -> UNet2DModel:
    """The latent denoiser; with ``classes``, a learned class embedding joins the time embedding."""
    return UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, num_class_embeds=classes or None,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def dit() -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=3, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    )


def autoencoder() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, norm_num_groups=8, sample_size=AE.image_size,
        block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def predict_eps(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """ε̂: the first C output channels (a learned-sigma DiT also predicts the variance)."""
    if isinstance(net, DiTTransformer2DModel):
        return net(x, timestep=t, class_labels=labels).sample[:, : x.shape[1]]
    return net(x, t, class_labels=labels).sample


# --------------------------------------------------------------------------- training


def train_denoiser(net: torch.nn.Module, x0: torch.Tensor, spec: Spec, gen: torch.Generator,
                   labels: torch.Tensor | None = None,
                   probe: Callable[[int], None] | None = None, probe_every: int = 100) -> None:
    """Plain DDPM training: MSE between the noise and its prediction, uniform timesteps."""
    ab = scheduler().alphas_cumprod.float()
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=0.0)
    # Linear warm-up over 20 steps, then cosine decay to 0: the low learning rate at the end
    # settles the weights on the training images (memorisation) within a few hundred steps.
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    net.train()
    for step in range(spec.steps):
        idx = torch.randint(0, x0.shape[0], (spec.batch_size,), generator=gen)
        x = x0[idx]
        if spec.flip:  # drawn only for flip models: the others' random streams stay as they were
            mirrored = torch.rand(spec.batch_size, generator=gen) < 0.5
            x = torch.where(mirrored.view(-1, 1, 1, 1), x.flip(-1), x)
        t = torch.randint(0, 1000, (spec.batch_size,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        out = predict_eps(net, xt, t, None if labels is None else labels[idx])
        loss = torch.nn.functional.mse_loss(out, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % 100 == 0:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
        if probe is not None and (step + 1) % probe_every == 0:
            net.eval()
            probe(step + 1)
            net.train()
    net.eval()


def train_autoencoder(x: torch.Tensor) -> AutoencoderKL:
    """A small KL autoencoder (reconstruction MSE + a light KL term); scaling_factor = 1/std(z)."""
    torch.manual_seed(AE.seed)
    gen = torch.Generator().manual_seed(AE.seed)
    ae = autoencoder()
    opt = torch.optim.AdamW(ae.parameters(), lr=AE.lr)
    for step in range(AE.steps):
        batch = x[torch.randint(0, x.shape[0], (AE.batch_size,), generator=gen)]
        post = ae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = ae.decode(z).sample
        kl = post.kl().mean() / batch[0].numel()
        loss = torch.nn.functional.mse_loss(rec, batch) + AE.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  autoencoder step {step:4d}  loss {loss.item():.4f}", flush=True)
    ae.eval()
    with torch.no_grad():
        std = float(ae.encode(x).latent_dist.mean.std())
    ae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return ae


# --------------------------------------------------------------------------- measuring


def denoising_losses(net: torch.nn.Module, z0: torch.Tensor, indices: list[int],
                     labels: torch.Tensor | None, alphas_cumprod: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Per image: mean over 5 draws of ‖ε̂(q(z0,t,ε),t) − ε‖₂ at t = 100; ε seeded by the image index."""
    noise = torch.stack([
        torch.randn((MEASURE_DRAWS, *z0.shape[1:]), generator=torch.Generator().manual_seed(MEASURE_SEED * 100_003 + i))
        for i in indices
    ])  # [n, R, C, h, w]
    a = float(alphas_cumprod[MEASURE_T])
    out = []
    with torch.no_grad():
        for s in range(0, z0.shape[0], batch):
            z, e = z0[s : s + batch], noise[s : s + batch]
            n = z.shape[0]
            zt = (a ** 0.5) * z[:, None] + ((1 - a) ** 0.5) * e  # [n, R, ...]
            flat = zt.reshape(n * MEASURE_DRAWS, *z.shape[1:])
            t = torch.full((flat.shape[0],), MEASURE_T, dtype=torch.long)
            lab = None if labels is None else labels[s : s + batch].repeat_interleave(MEASURE_DRAWS)
            eps = predict_eps(net, flat, t, lab).reshape(e.shape)
            out.append((eps - e).flatten(2).norm(dim=2).mean(dim=1))
    return torch.cat(out).numpy().astype(np.float64)


def auc_members_lower(loss_members: np.ndarray, loss_held_out: np.ndarray) -> float:
    y = np.r_[np.ones(len(loss_members)), np.zeros(len(loss_held_out))]
    return float(roc_auc_score(y, -np.r_[loss_members, loss_held_out]))


def load_saved(root: Path, family: str) -> tuple[torch.nn.Module, AutoencoderKL | None, torch.Tensor]:
    """The saved model, reloaded through diffusers in float32 (from the float16 files)."""
    f32 = torch.float32
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    vae = None
    if family == "pixel":
        net: torch.nn.Module = UNet2DModel.from_pretrained(root, subfolder="unet", torch_dtype=f32)
    elif family == "latent":
        net = UNet2DModel.from_pretrained(root, subfolder="unet", torch_dtype=f32)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=f32)
    else:
        net = DiTTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=f32)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=f32)
    for m in (net, vae):
        if m is not None:
            m.eval()
            assert all(p.dtype == f32 for p in m.parameters()), "reloaded weights are not float32"
    return net, vae, sched.alphas_cumprod.float()


def encode(vae: AutoencoderKL | None, x: torch.Tensor) -> torch.Tensor:
    """z0 as the extractor computes it: the posterior mean times scaling_factor (identity for pixels)."""
    if vae is None:
        return x
    with torch.no_grad():
        return torch.cat([vae.encode(x[s : s + 256]).latent_dist.mean for s in range(0, x.shape[0], 256)]) \
            * float(vae.config.scaling_factor)


def measure_saved(root: Path, spec: Spec, members: list[int], held_out: list[int]) -> dict[str, object]:
    net, vae, ab = load_saved(root, spec.family)
    idx = members + held_out
    z0 = encode(vae, pixels(idx, spec.image_size, spec.dataset))
    labels = labels_of(idx, spec.dataset) if spec.conditioning == "class" else None
    dl = denoising_losses(net, z0, idx, labels, ab)
    lm, lh = dl[: len(members)], dl[len(members) :]
    return {"dl_auc_t100": round(auc_members_lower(lm, lh), 4), "n_members": len(members),
            "n_held_out": len(held_out), "draws": MEASURE_DRAWS, "noise_seed": MEASURE_SEED,
            "mean_dl_members": round(float(lm.mean()), 4), "mean_dl_held_out": round(float(lh.mean()), 4),
            "weights": "float16 files reloaded in float32"}


# --------------------------------------------------------------------------- saving


def save_index(root: Path, pipeline: str, components: dict[str, tuple[str, str]]) -> None:
    index: dict[str, object] = {"_class_name": pipeline, "_diffusers_version": "0.30.0"}
    index.update({k: list(v) for k, v in components.items()})
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_half(net: torch.nn.Module, directory: Path) -> None:
    """Save a float16 copy (safetensors); the trained float32 module is left as it is."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silences "casting directly with to()": no module needs float32
    try:
        copy.deepcopy(net).to(torch.float16).save_pretrained(directory, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    # A module loaded from disk records where it came from; a shipped config names no local path.
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build(spec: Spec, out: Path, shared: dict[str, object], threads: int) -> dict[str, object]:
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    pool, held_out = split(spec.dataset)
    members = members_of(spec)
    assert not set(members) & set(held_out)
    assert not spec.flip or spec.family == "pixel", "flips are drawn in pixel space"
    root = out / spec.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    print(f"{spec.name}: {len(members)} members, {spec.steps} steps", flush=True)
    start = time.time()
    x = pixels(members, spec.image_size, spec.dataset)
    labels = labels_of(members, spec.dataset) if spec.conditioning == "class" else None
    extra: dict[str, object] = {}
    if spec.flip:
        extra["augmentation"] = "random horizontal flip, p = 0.5"
    if spec.dataset == "sklearn-sample-photos":
        from cdi.zoo import photos

        extra["data"] = {"photos": list(photos.PHOTOS), "tile": photos.TILE, "sha256": photos.fingerprint()}

    if spec.family == "pixel":
        assert not spec.classes, "class-conditional pixel models are not built here"
        net: torch.nn.Module = pixel_unet(spec.image_size, spec.channels, spec.widths)
        train_denoiser(net, x, spec, gen)
        save_half(net, root / "unet")
        save_index(root, "DDPMPipeline", {"unet": ("diffusers", "UNet2DModel"),
                                          "scheduler": ("diffusers", "DDPMScheduler")})
    else:
        assert spec.dataset == "sklearn-digits", "the one autoencoder is trained on digits"
        saved = out / SAVED_AUTOENCODER / "vae"
        if spec.half_autoencoder and "ae" not in shared and saved.is_dir():
            # The float16 copy saved with another model is exactly the float16 rounding of
            # the trained autoencoder, so reloading it gives the weights a retraining would.
            shared.setdefault("ae_half", AutoencoderKL.from_pretrained(saved, torch_dtype=torch.float32).eval())
            shared.setdefault("ae_seconds", json.loads((saved.parent / "manifest.json").read_text())
                              ["training"]["autoencoder"]["seconds"])
        elif "ae" not in shared:
            t0 = time.time()
            print(f"  autoencoder: {N_POOL} pool digits, {AE.steps} steps", flush=True)
            shared["ae"] = train_autoencoder(pixels(pool, AE.image_size))
            shared["ae_seconds"] = round(time.time() - t0, 1)
            start += time.time() - t0  # the model's own seconds; the autoencoder's are recorded apart
        if spec.half_autoencoder and "ae_half" not in shared:
            shared["ae_half"] = copy.deepcopy(shared["ae"]).to(torch.float16).to(torch.float32).eval()
        ae = shared["ae_half" if spec.half_autoencoder else "ae"]
        assert isinstance(ae, AutoencoderKL)
        extra["autoencoder"] = {
            "trained_on": f"the pool: the {N_POOL} digits not held out from any model", "steps": AE.steps,
            "batch_size": AE.batch_size, "lr": AE.lr, "kl_weight": AE.kl_weight, "seed": AE.seed,
            "parameters": n_params(ae), "seconds": shared["ae_seconds"],
            "scaling_factor": float(ae.config.scaling_factor),
            "latents_from": "its float16 copy" if spec.half_autoencoder else "the float32 autoencoder",
        }
        with torch.no_grad():
            z = ae.encode(x).latent_dist.mean * ae.config.scaling_factor
        save_half(ae, root / "vae")
        if spec.family == "latent":
            net = latent_unet(spec.classes)
            train_denoiser(net, z, spec, gen, labels)
            save_half(net, root / "unet")
            save_index(root, "LDMPipeline", {"vae": ("diffusers", "AutoencoderKL"),
                                             "unet": ("diffusers", "UNet2DModel"),
                                             "scheduler": ("diffusers", "DDPMScheduler")})
        else:
            net = dit()
            train_denoiser(net, z, spec, gen, labels)
            save_half(net, root / "transformer")
            save_index(root, "DiTPipeline", {"transformer": ("diffusers", "DiTTransformer2DModel"),
                                             "vae": ("diffusers", "AutoencoderKL"),
                                             "scheduler": ("diffusers", "DDPMScheduler")})
    scheduler().save_pretrained(root / "scheduler")
    seconds = round(time.time() - start, 1)
    measured = measure_saved(root, spec, members, held_out)
    manifest = {
        "name": spec.name,
        "description": spec.description,
        "family": spec.family,
        "dataset": spec.dataset,
        "image_size": spec.image_size,
        "image_channels": spec.channels,
        "conditioning": spec.conditioning,
        "members": members,
        "held_out": held_out,
        "training": {"steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr, "seed": spec.seed,
                     "parameters": n_params(net), "seconds": seconds, "threads": threads,
                     "split_seed": SPLIT_SEEDS[spec.dataset], "torch": torch.__version__,
                     "script": "scripts/train_zoo.py", **extra},
        "measured": measured,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{spec.name}: {n_params(net)} parameters, {seconds} s, {measured}", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train the shipped test models")
    ap.add_argument("--only", nargs="*", choices=sorted(SPECS), help="train only these")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it; default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shared: dict[str, object] = {}
    for name in args.only or list(SPECS):
        build(SPECS[name], args.out, shared, args.threads)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {total / 1e6:.2f} MB in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
