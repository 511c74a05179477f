"""Reference-calibrated against uncalibrated audits of the shipped LoRA fine-tune (method §10.2).

``digits-hard-lora`` is a LoRA on ``digits-hard`` fitted to 100 digits the base never saw
(``scripts/train_lora.py``). All 26 features of its members and of held-out digits (seen by
neither model) are computed once under the fine-tune and once under the base, with the same
per-image noise (seed 0), and cached in ``--cache``. Then audits are resampled from them:

- positive audits: P = n random members, U = n random held-out digits;
- null audits: P and U = two disjoint random sets of held-out digits (every detection is a
  false positive).

Each audit runs the project's default test procedure (``cdi.stats.run_test`` with the
options an audit gives it, ``AuditOptions().protocol_options``) twice: on the fine-tune's
features (uncalibrated) and on the fine-tune's minus the base's (calibrated). It prints the
power at α = 0.01 per n and the false-positive rate, both with 95 % Clopper–Pearson
intervals, and the smallest n in the grid with 90 % power.

    python bench/lora_calibration.py [--sizes 10 15 20 30 40 50] [--positive 100] [--null 200] [--held-out 200]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from cdi.audit import AuditOptions
from cdi.errors import InputError
from cdi.options import DEFAULT_EXCEEDANCES, DEFAULT_PROTOCOL
from cdi.stats import run_test

LORA = "digits-hard-lora"
ALPHA = 0.01
#: The audit's test options; the directional p-value's decision at α needs only ⌈h/α⌉ draws.
OPTIONS = AuditOptions(max_permutations=int(DEFAULT_EXCEEDANCES / ALPHA)).protocol_options


def _sha(image: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return hashlib.sha256(buf.getvalue()).hexdigest()


def features(cache: Path, n_held_out: int, tags: tuple[str, ...] = ("tuned", "base"),
             batch_size: int = 50) -> dict[str, np.ndarray]:
    """members/held_out features under the fine-tune and the base: ``[n, 26]`` arrays, each
    model's cached in its own file (``--only`` computes one, so two processes can share)."""
    from cdi import zoo

    lora = zoo.get_lora(LORA)
    held = lora.held_out[:n_held_out]
    out: dict[str, np.ndarray] = {}
    for tag in tags:
        path = cache / f"{LORA}-{n_held_out}-{tag}.npz"
        if not path.is_file():
            _compute(tag, lora, held, path, batch_size)
        out.update(dict(np.load(path)))
    return out


def _compute(tag: str, lora: object, held: tuple[int, ...], path: Path, batch_size: int) -> None:
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput
    from cdi.images import to_model_array
    from cdi.models import load_model
    from cdi.zoo import digits

    size = int(lora.manifest["image_size"])  # type: ignore[attr-defined]

    def items(indices: tuple[int, ...]) -> list[ExtractionInput]:
        out = []
        for i in indices:
            img = digits.image(i, size)
            out.append(ExtractionInput(_sha(img), to_model_array(img, size, 1)))
        return out

    adapter = load_model(LORA) if tag == "tuned" else load_model(lora.base)  # type: ignore[attr-defined]
    ex = FeatureExtractor(adapter, seed=0, batch_size=batch_size)
    start = time.time()
    members = ex.extract(items(lora.members))  # type: ignore[attr-defined]
    held_out = ex.extract(items(held))
    print(f"features under {tag}: {time.time() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{tag}_members": members, f"{tag}_held_out": held_out})


def interval(k: int, n: int) -> str:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return f"{k / n:.2f} [{ci.low:.2f}, {ci.high:.2f}]"


def rejections(pool_p: dict[str, np.ndarray], pool_u: dict[str, np.ndarray], n: int, runs: int,
               seed: int, disjoint: bool) -> dict[str, int]:
    """How many of ``runs`` audits of n + n images reject at α, per mode."""
    rng = np.random.default_rng(seed)
    hits = {"uncalibrated": 0, "calibrated": 0}
    for r in range(runs):
        if disjoint:  # null: P and U from the same pool, disjoint
            idx = rng.permutation(len(pool_u["tuned"]))[: 2 * n]
            ip, iu = idx[:n], idx[n:]
        else:
            ip = rng.choice(len(pool_p["tuned"]), n, replace=False)
            iu = rng.choice(len(pool_u["tuned"]), n, replace=False)
        for mode in hits:
            def x(pool: dict[str, np.ndarray], i: np.ndarray, mode: str = mode) -> np.ndarray:
                return pool["tuned"][i] - pool["base"][i] if mode == "calibrated" else pool["tuned"][i]
            res = run_test(x(pool_p, ip), x(pool_u, iu), DEFAULT_PROTOCOL, OPTIONS, alpha=ALPHA,
                           random_state=seed * 100_003 + r)
            hits[mode] += int(res.p_value < ALPHA and res.statistic > 0)
    return hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 15, 20, 30, 40, 50])
    ap.add_argument("--positive", type=int, default=100)
    ap.add_argument("--null", type=int, default=200)
    ap.add_argument("--null-size", type=int, default=20)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path(".cdi/study-cache"))
    ap.add_argument("--only", choices=["tuned", "base"], help="only compute and cache one model's features")
    args = ap.parse_args(argv)
    if args.only:
        features(args.cache, args.held_out, (args.only,))
        return 0
    f = features(args.cache, args.held_out)
    members = {"tuned": f["tuned_members"], "base": f["base_members"]}
    held = {"tuned": f["tuned_held_out"], "base": f["base_held_out"]}
    print(f"{LORA}: {len(members['tuned'])} members, {len(held['tuned'])} held-out; "
          f"default protocol {DEFAULT_PROTOCOL.value}; α = {ALPHA}")
    print(f"| n per set | uncalibrated power | calibrated power |  ({args.positive} positive audits per n)")
    print("|---|---|---|")
    first: dict[str, int | None] = {"uncalibrated": None, "calibrated": None}
    for n in args.sizes:
        try:
            hits = rejections(members, held, n, args.positive, seed=n, disjoint=False)
        except InputError as exc:  # below the default procedure's smallest set
            print(f"| {n} | ({exc}) | |")
            continue
        print(f"| {n} | {interval(hits['uncalibrated'], args.positive)} | "
              f"{interval(hits['calibrated'], args.positive)} |", flush=True)
        for mode, k in hits.items():
            if first[mode] is None and k / args.positive >= 0.9:
                first[mode] = n
    null = rejections(held, held, args.null_size, args.null, seed=999, disjoint=True)
    print(f"false-positive rate at α = {ALPHA}, {args.null} null audits of {args.null_size} + {args.null_size}: "
          f"uncalibrated {interval(null['uncalibrated'], args.null)}, "
          f"calibrated {interval(null['calibrated'], args.null)}")
    print(f"smallest n with 90 % power: uncalibrated {first['uncalibrated'] or '> ' + str(args.sizes[-1])}, "
          f"calibrated {first['calibrated'] or '> ' + str(args.sizes[-1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
