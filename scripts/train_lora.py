"""Fine-tune a shipped model with a LoRA on digits its base never saw (seeded, CPU, minutes).

    python scripts/train_lora.py [--out cdi/zoo/loras] [--threads 2]

The fixture of reference-calibrated audits (method §10.2): ``digits-hard-lora`` is a LoRA
on ``digits-hard`` (a pixel DDPM trained on 500 digits whose per-image loss mostly says how
hard a digit is, not whether it was trained on), fitted to 100 new digits drawn from the
797 that ``scripts/train_zoo.py`` holds out from every model. Its members were never seen
by the base; its held-out images (the other 697) were seen by neither. The LoRA (rank 8 on
every convolution, attention projection and time-embedding projection of the UNet, peft's
format: ``adapter_config.json`` + ``adapter_model.safetensors``) is trained with the base
frozen, by the same DDPM objective as the base, and saved in float16.

After saving, the LoRA is reloaded onto the base through :func:`cdi.models.load_model` (the
path an audit takes) and the denoising-loss AUC of members against held-out digits is
measured for the fine-tune, for the base, and for the calibrated loss (fine-tune minus
base with the same noise): the manifest records all three.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from train_zoo import auc_members_lower, denoising_losses, pixels, split  # noqa: E402

from cdi.zoo import get  # noqa: E402

NAME = "digits-hard-lora"
BASE = "digits-hard"
SEED = 20251201
N_MEMBERS = 100
RANK = 8
STEPS = 500
BATCH = 50
LR = 2e-3
TARGETS = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0", "time_emb_proj"]
DEFAULT_OUT = ROOT / "cdi" / "zoo" / "loras"


def member_split() -> tuple[list[int], list[int]]:
    """(members, held-out): a seeded draw of 100 from the 797 digits no shipped model saw."""
    _, never_seen = split()
    order = np.random.default_rng(SEED).permutation(len(never_seen)).tolist()
    members = sorted(never_seen[i] for i in order[:N_MEMBERS])
    return members, sorted(set(never_seen) - set(members))


def train(out_dir: Path) -> dict[str, object]:
    from diffusers import DDPMScheduler, UNet2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    base_dir = get(BASE).path
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    unet = UNet2DModel.from_pretrained(base_dir, subfolder="unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, lora_dropout=0.0)
    unet = inject_adapter_in_model(config, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    members, _ = member_split()
    x0 = pixels(members, get(BASE).image_size)
    ab = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler").alphas_cumprod.float()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    unet.train()
    start = time.time()
    for step in range(STEPS):
        idx = torch.randint(0, x0.shape[0], (BATCH,), generator=gen)
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        noise = torch.randn(x0[idx].shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x0[idx] + (1 - a).sqrt() * noise, t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
    seconds = time.time() - start
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "lora").mkdir(parents=True)
    save_file(state, str(out_dir / "lora" / "adapter_model.safetensors"))
    config.save_pretrained(str(out_dir / "lora"))
    return {"steps": STEPS, "batch_size": BATCH, "lr": LR, "seed": SEED, "rank": RANK, "targets": TARGETS,
            "parameters": int(sum(v.numel() for v in state.values())), "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "script": "scripts/train_lora.py"}


def measure(out_dir: Path) -> dict[str, object]:
    from cdi.models import load_model

    members, held_out = member_split()
    idx = members + held_out
    x = pixels(idx, get(BASE).image_size)
    base = load_model(BASE)
    tuned = load_model(BASE, lora=str(out_dir / "lora"))
    losses = {}
    for name, adapter in (("fine_tune", tuned), ("base", base)):
        net = adapter.unet  # type: ignore[attr-defined]
        losses[name] = denoising_losses(net, x, idx, None, adapter.alphas_cumprod.float())  # type: ignore[attr-defined]
    n = len(members)
    cal = losses["fine_tune"] - losses["base"]
    return {"dl_auc_t100": round(auc_members_lower(losses["fine_tune"][:n], losses["fine_tune"][n:]), 4),
            "base_dl_auc_t100": round(auc_members_lower(losses["base"][:n], losses["base"][n:]), 4),
            "calibrated_dl_auc_t100": round(auc_members_lower(cal[:n], cal[n:]), 4),
            "n_members": n, "n_held_out": len(held_out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = args.out / NAME
    training = train(out_dir)
    members, held_out = member_split()
    manifest = {
        "name": NAME,
        "description": f"LoRA (rank {RANK}) fine-tune of {BASE} on 100 digits its base never saw: "
                       "the fixture of reference-calibrated audits",
        "base": BASE, "lora": "lora", "family": "pixel", "dataset": "sklearn-digits",
        "image_size": get(BASE).image_size, "image_channels": 1, "conditioning": "none",
        "members": members, "held_out": held_out, "training": training,
    }
    # One reference names the fine-tune: `--model digits-hard-lora` or a registry entry.
    (out_dir / "lora_model.json").write_text(json.dumps({"base": BASE, "lora": "lora"}, indent=1) + "\n")
    manifest["measured"] = measure(out_dir)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["measured"]))


if __name__ == "__main__":
    main()
