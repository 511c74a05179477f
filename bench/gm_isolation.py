"""Benchmark: GM's masks from fused gradient passes (near-ties recomputed alone) against
every gradient pass isolated, one sample per network call (the previous way).

Both run in this process, alternating, on a shipped model's digits. Prints images per
second of each, their ratio, the share of (image, timestep) masks recomputed alone, and
checks that the features of both agree: the masks must be identical, so GM's columns agree
to float rounding of the masked error (rtol 1e-5).

    python bench/gm_isolation.py [--model digits-memorised] [--images 100] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from cdi.features import FeatureExtractor
from cdi.features.passes import PassRunner
from cdi.models import load_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from extractor_speed import zoo_inputs


class IsolateEverything(PassRunner):
    """Every GM mask counts as a near-tie, so every gradient pass is recomputed alone."""

    @property
    def rounding(self) -> float:
        return float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-memorised")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    adapter = load_model(args.model)
    items = zoo_inputs(args.model, args.images)
    n = len(items)
    print(f"model {args.model}, {n} images, batch {args.batch_size}, {torch.get_num_threads()} threads")
    best: dict[str, tuple[float, np.ndarray, int]] = {}
    for _ in range(args.repeats):
        for label in ("isolated", "fused"):
            ex = FeatureExtractor(adapter, batch_size=args.batch_size, prefetch=False)
            if label == "isolated":
                ex.runner = IsolateEverything(adapter, budget=ex.runner.budget)
            start = time.perf_counter()
            values = ex.extract(items)
            seconds = time.perf_counter() - start
            if label not in best or seconds < best[label][0]:
                best[label] = (seconds, values, ex.passes.backward)
    (iso_s, iso_v, iso_b), (fus_s, fus_v, fus_b) = best["isolated"], best["fused"]
    gm = slice(4, 14)
    # Isolated recomputes all 10 masks per image; fused, one backward pass per recomputed mask.
    recomputed = (fus_b - iso_b) / n + 10
    for label, (s, _, b) in best.items():
        print(f"{label:9s} {n / s:7.2f} images/s   {b / n:5.1f} backward passes per image")
    print(f"speed-up  {iso_s / fus_s:.2f}x   masks recomputed alone: {recomputed / 10:.1%}")
    if not np.allclose(fus_v[:, gm], iso_v[:, gm], rtol=1e-5, atol=0):
        worst = np.max(np.abs(fus_v[:, gm] / iso_v[:, gm] - 1))
        print(f"FAIL: GM differs between the two (max relative {worst:.2e})", file=sys.stderr)
        return 1
    print("GM features agree (rtol 1e-5): every mask is the same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
