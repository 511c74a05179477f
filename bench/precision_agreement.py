"""Agreement of reduced-precision passes with float32: per-feature error and audit verdicts.

For each shipped model, computes all 26 features of members and held-out images twice, in
float32 and under bfloat16 autocast (``precision="bf16"``; features still accumulated in
float32), and prints per feature the median and largest relative difference, then runs the
default audit test on both: a positive audit (P = members, U = held-out images) and a null
audit (P and U two halves of the held-out images), and prints both p-values and verdicts.

On a machine without a GPU this runs bfloat16 autocast on the CPU, a proxy for CUDA's: the
same number format, with the CPU's kernels (see docs/performance.md).

    python bench/precision_agreement.py [--models digits-memorised photos-rgb] [--images 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cdi import zoo
from cdi.features import FeatureExtractor
from cdi.features.extractor import ExtractionInput
from cdi.features.layout import FEATURE_NAMES
from cdi.images import to_model_array
from cdi.models import load_model
from cdi.stats import run_test


def items(model: zoo.ZooModel, indices: tuple[int, ...]) -> list[ExtractionInput]:
    prefix = zoo.DATASETS[model.dataset].PREFIX
    return [
        ExtractionInput(f"{prefix}-{i}", to_model_array(model.image(i), model.image_size, model.image_channels),
                        model.label(i) if model.conditioning == "class" else None)
        for i in indices
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-memorised", "photos-rgb"])
    ap.add_argument("--images", type=int, default=40, help="members, and twice as many held-out images")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    alpha = 0.01
    disagreements = 0
    for name in args.models:
        model = zoo.get(name)
        adapter = load_model(name, device=args.device)
        data = items(model, tuple(model.members[: args.images]) + tuple(model.held_out[: 2 * args.images]))
        values = {}
        for precision in ("fp32", args.precision):
            start = time.perf_counter()
            values[precision] = FeatureExtractor(adapter, seed=0, batch_size=40, precision=precision).extract(data)
            print(f"{name}: {precision} features of {len(data)} images in {time.perf_counter() - start:.0f} s",
                  flush=True)
        ref, low = values["fp32"], values[args.precision]
        rel = np.abs(low / ref - 1)
        print(f"{'feature':14s} {'median':>9s} {'max':>9s}   relative difference, {args.precision} against fp32")
        for j, feature in enumerate(FEATURE_NAMES):
            print(f"{feature:14s} {np.median(rel[:, j]):9.2e} {np.max(rel[:, j]):9.2e}")
        n = args.images
        audits = {
            "positive": (slice(0, n), slice(n, 3 * n)),
            "null": (slice(n, 2 * n), slice(2 * n, 3 * n)),
        }
        for audit, (p, u) in audits.items():
            results = {k: run_test(v[p], v[u], alpha=alpha, random_state=0) for k, v in values.items()}
            verdicts = {k: r.p_value < alpha for k, r in results.items()}
            same = len(set(verdicts.values())) == 1
            disagreements += not same
            print(f"{name} {audit:8s} audit: p fp32 {results['fp32'].p_value:.3g} "
                  f"({'rejects' if verdicts['fp32'] else 'does not reject'}), p {args.precision} "
                  f"{results[args.precision].p_value:.3g} "
                  f"({'rejects' if verdicts[args.precision] else 'does not reject'}): "
                  f"{'same verdict' if same else 'DIFFERENT verdict'}")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
