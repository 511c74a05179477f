"""Measure which of the 26 CDI features carry each shipped model's membership signal.

    python scripts/measure_zoo.py [--only NAME ...] [--held-out-sample N] [--threads 2] [--cache DIR] [--dry-run]

For every member and every held-out image of a shipped model, the project's extractor
(``cdi.features.FeatureExtractor``, seed 0, through ``cdi.models.load_model``, exactly as an
audit computes them) gives all 26 features; for each feature the script prints and writes
into the model's ``manifest.json`` (``measured.features``) the members-vs-held-out AUC
oriented so that 0.5 is no signal and 1 is "every member has a lower value than every
held-out image" (below 0.5: members have higher values). With ``--cache DIR`` the feature
matrices are kept in ``DIR/<model>.npz`` (``members``, ``held_out``) and reused; they are
the same matrices ``bench/statistics_study.py`` computes (same seed, keys and batches), so
``--cache .cdi/study-cache`` gives the study its features. ``--held-out-sample N`` measures
all members against a seeded random sample of N held-out images (no cache is written then).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cdi import zoo  # noqa: E402
from cdi.features.layout import FEATURE_NAMES, LAYOUT_VERSION  # noqa: E402

SEED = 0
BATCH = 100


def held_out_sample(model: zoo.ZooModel, n: int | None) -> tuple[int, ...]:
    """All held-out images, or a seeded random ``n`` of them (in index order)."""
    if n is None or n >= len(model.held_out):
        return model.held_out
    rng = np.random.default_rng(SEED)
    return tuple(sorted(int(i) for i in rng.choice(model.held_out, n, replace=False)))


def features(model: zoo.ZooModel, held_out_indices: tuple[int, ...],
             cache: Path | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(members [N, 26], held-out [M, 26], seconds) of ``model``; from ``cache`` when there."""
    full = held_out_indices == model.held_out
    path = cache / f"{model.name}.npz" if cache is not None and full else None
    if path is not None and path.is_file():
        data = np.load(path)
        return data["members"], data["held_out"], float(data["seconds"])
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput
    from cdi.images import to_model_array
    from cdi.models import load_model

    extractor = FeatureExtractor(load_model(model.name), seed=SEED, batch_size=BATCH)

    prefix = zoo.DATASETS[model.dataset].PREFIX

    def items(indices: tuple[int, ...]) -> list[ExtractionInput]:
        # The key that seeds each image's noise draws, as bench/statistics_study.py keys it,
        # so that the two scripts' feature caches are interchangeable.
        return [ExtractionInput(
            f"{prefix}-{i}",
            to_model_array(model.image(i), model.image_size, model.image_channels),
            model.label(i) if model.conditioning == "class" else None,
        ) for i in indices]

    start = time.perf_counter()
    members = extractor.extract(items(model.members))
    held_out = extractor.extract(items(held_out_indices))
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, members=members, held_out=held_out, seconds=seconds)
    return members, held_out, seconds


def feature_aucs(members: np.ndarray, held_out: np.ndarray) -> dict[str, float]:
    """Per feature: P(member value < held-out value), ties counted half."""
    y = np.r_[np.ones(len(members)), np.zeros(len(held_out))]
    return {name: round(float(roc_auc_score(y, -np.r_[members[:, j], held_out[:, j]])), 4)
            for j, name in enumerate(FEATURE_NAMES)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="per-feature membership AUC of the shipped models")
    ap.add_argument("--only", nargs="*", help="measure only these models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-out-sample", type=int, default=None, metavar="N",
                    help="measure against a seeded random N of the held-out images (default: all)")
    ap.add_argument("--cache", type=Path, default=None, help="keep the feature matrices here")
    ap.add_argument("--dry-run", action="store_true", help="print, do not write the manifests")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    names = args.only or [m.name for m in zoo.list_models()]
    for name in names:
        model = zoo.get(name)
        held_out_indices = held_out_sample(model, args.held_out_sample)
        print(f"{name}: {len(model.members)} members, {len(held_out_indices)} of {len(model.held_out)} held out",
              flush=True)
        members, held_out, seconds = features(model, held_out_indices, args.cache)
        aucs = feature_aucs(members, held_out)
        for feature, auc in aucs.items():
            print(f"  {feature:14s} {auc:.3f}")
        strongest = max(aucs, key=lambda f: abs(aucs[f] - 0.5))
        print(f"  strongest: {strongest} ({aucs[strongest]:.3f}); {seconds:.0f} s", flush=True)
        if args.dry_run:
            continue
        manifest_path = model.path / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["measured"]["features"] = {
            "auc_members_lower": aucs, "layout": LAYOUT_VERSION, "extractor_seed": SEED,
            "n_members": len(members), "n_held_out": len(held_out),
            "held_out": "all" if held_out_indices == model.held_out else f"a random {len(held_out)} (seed {SEED})",
            "seconds": round(seconds, 1),
            "threads": args.threads, "script": "scripts/measure_zoo.py",
        }
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
