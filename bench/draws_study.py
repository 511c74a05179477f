"""Draws study: DL's noise draws and ML's against power per network pass, on every shipped model.

The default audit's test reads DL (the denoising loss at t = 100, averaged over R fresh
noise draws), PIA (2 passes, no draw) and ML at t = 0, 100, 200, 300 (one shared draw: 4
passes). Within a budget of 15 forward passes per image, the 4 passes left can buy DL more
draws (R up to 9) or ML a second draw at each of its timesteps. Which buys more power?

For each model, the losses of each draw are computed once for ``--images`` members and as
many held-out images (16 DL draws at t = 100; 4 ML draws at each of its 4 timesteps) and
cached under ``--cache``; the draws are the image's own (seeded by the image's identity),
as the extractor's are. Then, for each number of draws, ``--audits`` audits of n + n images
resampled from them (P members, U held-out) test each candidate as the directional test
does, on its own: one-sided Welch on the log of the per-image mean loss (for ML: the mean over
its timesteps of the standardised log losses), α = 0.01. Printed per model: each
candidate's per-image AUC (P lower) and power at n = 10 and 20, with the passes it costs.

    nice -n 10 python bench/draws_study.py [--models ...] [--images 100] [--audits 1000]

Run time is bounded by ``--max-seconds`` (models not reached are reported as skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

DL_T = 100
ML_TS = (0, 100, 200, 300)
DL_DRAWS = (1, 2, 5, 8, 9, 16)
ML_DRAWS = (1, 2, 4)
SIZES = (10, 20)
ALPHA = 0.01


def _generator(seed: int, name: str) -> Any:
    import torch

    digest = hashlib.sha256(f"cdi-draws-study/1:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def losses(model_name: str, images: int, cache: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-draw losses of members and held-out images: ``dl`` ``[N, 16]``, ``ml`` ``[N, 4 draws, 4 t]``."""
    path = cache / f"draws-{model_name}-{images}.npz"
    if path.is_file():
        return dict(np.load(path))
    import torch

    from cdi import zoo
    from cdi.images import to_model_array
    from cdi.models import load_model

    model = zoo.get(model_name)
    adapter = load_model(model_name)
    out: dict[str, np.ndarray] = {}
    for role, indices in (("members", model.members[:images]), ("held_out", model.held_out[:images])):
        dl_rows, ml_rows = [], []
        for i in indices:
            pixels = torch.from_numpy(to_model_array(model.image(i), model.image_size, model.image_channels))[None]
            label = model.label(i) if model.conditioning == "class" else None
            cond = adapter.condition([label], [None])
            with torch.inference_mode():
                z0 = adapter.encode(pixels).float()
                g = _generator(seed, f"{model_name}:{i}")
                dl_eps = torch.randn((max(DL_DRAWS), *z0.shape[1:]), generator=g)
                ml_eps = torch.randn((max(ML_DRAWS), *z0.shape[1:]), generator=g)
                a, s = adapter.schedule.coefficients(DL_T)
                z = a * z0 + s * dl_eps
                t = torch.full((len(z),), DL_T, dtype=torch.long)
                c = None if cond is None else cond.expand(len(z), *cond.shape[1:])
                pred = adapter.eps(z, t, c).float()
                dl_rows.append((pred - dl_eps).flatten(1).norm(dim=1).numpy())
                ml = np.empty((max(ML_DRAWS), len(ML_TS)))
                for j, tt in enumerate(ML_TS):
                    a, s = adapter.schedule.coefficients(tt)
                    z = a * z0 + s * ml_eps
                    t = torch.full((len(z),), tt, dtype=torch.long)
                    c = None if cond is None else cond.expand(len(z), *cond.shape[1:])
                    ml[:, j] = (adapter.eps(z, t, c).float() - ml_eps).flatten(1).norm(dim=1).numpy()
                ml_rows.append(ml)
        out[f"dl_{role}"] = np.asarray(dl_rows)
        out[f"ml_{role}"] = np.asarray(ml_rows)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def auc_lower(p: np.ndarray, u: np.ndarray) -> float:
    """P(a member's value < a held-out image's value), ties counting half."""
    return float((p[:, None] < u[None, :]).mean() + 0.5 * (p[:, None] == u[None, :]).mean())


def power(p: np.ndarray, u: np.ndarray, n: int, audits: int, rng: np.random.Generator) -> float:
    """Share of ``audits`` resampled n + n audits where Welch finds P's values lower at α."""
    hits = 0
    for _ in range(audits):
        a = p[rng.choice(len(p), n, replace=False)]
        b = u[rng.choice(len(u), n, replace=False)]
        hits += sps.ttest_ind(a, b, equal_var=False, alternative="less").pvalue < ALPHA
    return hits / audits


def ml_candidate(ml: np.ndarray, draws: int, ref: np.ndarray) -> np.ndarray:
    """Per image: mean over t of the log of the mean over ``draws`` draws, standardised by ``ref``'s spread."""
    x = np.log(ml[:, :draws, :].mean(axis=1))
    r = np.log(ref[:, :draws, :].mean(axis=1))
    return ((x - r.mean(axis=0)) / r.std(axis=0)).mean(axis=1)


def main(argv: list[str] | None = None) -> int:
    from cdi import zoo

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m.name for m in zoo.list_models()])
    ap.add_argument("--images", type=int, default=100, help="members and as many held-out images per model")
    ap.add_argument("--audits", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path(".cdi"))
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="stop starting new models after this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    header = " ".join(f"{f'power n={n}':>11s}" for n in SIZES)
    print(f"{'model':20s} {'candidate':12s} {'passes':>6s} {'AUC':>6s} {header}")
    for name in args.models:
        if time.perf_counter() - start > args.max_seconds:
            print(f"{name:20s} skipped: --max-seconds reached")
            continue
        model = zoo.get(name)
        k = min(args.images, len(model.members), len(model.held_out))
        data = losses(name, k, args.cache, args.seed)
        rng = np.random.default_rng([args.seed, 7])
        rows = []
        for r in DL_DRAWS:
            p, u = np.log(data["dl_members"][:, :r].mean(axis=1)), np.log(data["dl_held_out"][:, :r].mean(axis=1))
            rows.append((f"DL R={r}", r, p, u))
        for d in ML_DRAWS:
            ref = np.concatenate([data["ml_members"], data["ml_held_out"]])
            p, u = ml_candidate(data["ml_members"], d, ref), ml_candidate(data["ml_held_out"], d, ref)
            rows.append((f"ML {d} draw{'s' if d > 1 else ''}", d * len(ML_TS), p, u))
        for label, passes, p, u in rows:
            powers = " ".join(f"{power(p, u, n, args.audits, rng):11.3f}" if n <= k else f"{'-':>11s}"
                              for n in SIZES)
            print(f"{name:20s} {label:12s} {passes:6d} {auc_lower(p, u):6.3f} {powers}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
