"""Benchmark: the default audit's extraction against a baseline that spends passes as the published code does.

The extractor computes the feature set ``--features`` (default ``verdict``: what the default
audit's verdict reads, see :mod:`cdi.reads`); the baseline always computes all 26, the
published way, as the published pipeline does for every audit.

The baseline (:func:`published_features`) runs each feature family on its own, as the
published CDI code does: each family encodes the images again and makes its own network
calls, one per timestep, on the batch; GM's gradient passes run with the parameters'
gradients enabled (the published code leaves ``requires_grad`` on, so every backward pass
also computes the weight gradients), and NO optimises the batch jointly with SciPy's
L-BFGS-B (5 iterations, each with its line-search evaluations) and evaluates its final loss
on a re-noised input; DL averages the published 5 noise draws. It uses the extractor's noise
and formulas, so the features other than DL's and NO's must agree with the extractor's.

Each timed run is a fresh child process (model load and a warm-up excluded from the time),
so its peak resident memory is its own; runs alternate baseline / extractor so both see the
same machine load, and the best of ``--repeats`` is kept.

    python bench/extractor_speed.py --model digits-memorised --images 64 --batch-size 32
    python bench/extractor_speed.py --model unet-30m --images 8 --batch-size 8
    python bench/extractor_speed.py --verdicts digits-memorised digits-dit photos-rgb

Forward-pass equivalents per image count a backward pass at its measured cost (the time of
the run's backward passes per sample over that of its forward passes). ``--verdicts`` runs,
on each shipped model named, the default audit and the same audit with ``features="all"``
on the same images and seed, and checks that their verdicts and p-values are identical and
the features the verdict reads bit-identical.

``unet-30m`` is a random-weight ``UNet2DModel`` (64×64 RGB, ~29 M parameters) built from a
config, where the network's cost dominates. Prints images/s, passes per image and peak RSS of
each, their ratios, and where the time goes (network passes, encoding, the rest).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

UNET_30M = "unet-30m"
#: DL's noise draws in the published code (the extractor's default is 9: docs/method.md).
PUBLISHED_DL_DRAWS = 5


def build_unet_30m(root: Path) -> Path:
    """A random-weight pixel DDPM, 64×64 RGB, ~29 M parameters, saved as a diffusers directory."""
    import json

    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(64, 128, 256, 320),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def zoo_inputs(name: str, n: int) -> list[Any]:
    """``n`` images (members first) of the shipped model ``name``, preprocessed."""
    from cdi import zoo
    from cdi.features.extractor import ExtractionInput
    from cdi.images import ImageFile, open_image, to_model_array

    model = zoo.get(name)
    indices = (list(model.members) + list(model.held_out))[:n]
    out = []
    for i in indices:
        buf = io.BytesIO()
        model.image(i).save(buf, format="PNG")
        f = ImageFile(f"{name}-{i}.png", buf.getvalue())
        cond = model.label(i) if model.conditioning == "class" else None
        pixels = to_model_array(open_image(f.data, f.name), model.image_size, model.image_channels)
        out.append(ExtractionInput(f.sha256, pixels, cond))
    return out


def random_inputs(channels: int, size: int, n: int) -> list[Any]:
    from cdi.features.extractor import ExtractionInput

    rng = np.random.default_rng(0)
    return [ExtractionInput(f"{i:064x}", rng.uniform(-1, 1, (channels, size, size)).astype(np.float32))
            for i in range(n)]


# --- the baseline ---------------------------------------------------------------------------


class PublishedPasses:
    """Network calls as the published code makes them: one per call, on the batch, under
    ``no_grad`` or, for a gradient, with the parameters' gradients enabled too."""

    def __init__(self, adapter: Any, cond: Any) -> None:
        self.adapter = adapter
        self.cond = cond
        self.forward = 0
        self.backward = 0

    def params(self) -> list[Any]:
        import torch

        return [p for m in vars(self.adapter).values() if isinstance(m, torch.nn.Module) for p in m.parameters()]

    def eps(self, z: Any, t: int, cond: Any) -> Any:
        import torch

        self.forward += int(z.shape[0])
        with torch.no_grad():
            return self.adapter.eps(z, t, cond).float()

    def value_and_grad(self, z: Any, t: int, cond: Any, loss: Callable[[Any], Any]) -> tuple[Any, Any, float]:
        """ε̂(z, t), the gradient in z of ``loss(ε̂)`` (weight gradients computed as well), the loss."""
        import torch

        params = self.params()
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                zg = z.detach().clone().requires_grad_(True)
                eps = self.adapter.eps(zg, t, cond).float()
                value = loss(eps)
                value.backward()
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        self.forward += int(z.shape[0])
        self.backward += int(z.shape[0])
        assert zg.grad is not None
        return eps.detach(), zg.grad.detach(), float(value.detach())

    def drive(self, family: Any) -> Any:
        """Run a family generator call by call."""
        from cdi.features.context import CallResult, l2

        reply = None
        while True:
            try:
                calls = next(family) if reply is None else family.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = []
            for c in calls:
                cond = self.cond if self.cond is None or c.rows is None else self.cond[list(c.rows)]
                if c.target is None:
                    reply.append(CallResult(self.eps(c.z, c.t, cond)))
                else:
                    target = c.target
                    eps, grad, _ = self.value_and_grad(c.z, c.t, cond, lambda e, tg=target: l2(e - tg).sum())
                    reply.append(CallResult(eps, grad))


def published_no(passes: PublishedPasses, batch: Any) -> Any:
    """NO as published: the batch's mean loss minimised jointly by L-BFGS-B, final loss re-noised."""
    import torch
    from scipy.optimize import minimize

    from cdi.features.context import l2

    cfg, noise = batch.config, batch.noise.shared
    t = cfg.no_t
    x_t = batch.q(t, noise)
    shape = x_t.shape

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        delta = torch.from_numpy(flat.astype(np.float32)).view(shape)
        _, grad, value = passes.value_and_grad(x_t + delta, t, passes.cond, lambda e: l2(e - noise).mean())
        return value, grad.double().numpy().ravel()

    res = minimize(fun, np.zeros(x_t.numel()), jac=True, method="L-BFGS-B", options={"maxiter": cfg.no_steps})
    delta = torch.from_numpy(res.x.astype(np.float32)).view(shape)
    renoised = batch.q(t, noise) + delta  # the published code noises x_t + δ again
    eps = passes.eps(renoised, t, passes.cond)
    return torch.stack([l2(eps - noise), l2(delta)], dim=1)


def published_features(adapter: Any, items: list[Any], seed: int, batch_size: int) -> tuple[np.ndarray, int, int]:
    """All 26 features, the published code's way; returns values and forward/backward passes."""
    import torch

    from cdi.features import FeatureConfig
    from cdi.features.context import Batch, NoiseDraws
    from cdi.features.extractor import FAMILIES
    from cdi.features.layout import FAMILY_COLUMNS, FEATURE_NAMES

    config = FeatureConfig(dl_repeats=PUBLISHED_DL_DRAWS)
    out = np.full((len(items), len(FEATURE_NAMES)), np.nan)
    fwd = bwd = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([it.pixels for it in chunk]))
        conds = [adapter.condition([it.condition]) for it in chunk]
        cond = None if any(c is None for c in conds) else torch.cat(conds)
        passes = PublishedPasses(adapter, cond)
        for name, family in FAMILIES.items():
            with torch.no_grad():  # every family encodes again
                z0 = torch.cat([adapter.encode(p[None]).float() for p in pixels])
            noise = NoiseDraws.draw(seed, [it.sha256 for it in chunk], z0.shape[1:], config.dl_repeats, z0.device)
            # Rounding 0: only exact ties are recomputed, as good as the published code's masks.
            batch = Batch(adapter, z0, noise, config, rounding=0.0)
            values = published_no(passes, batch) if name == "no" else passes.drive(family.run(batch))
            out[start : start + len(chunk), FAMILY_COLUMNS[name]] = values.double().numpy()
        fwd += passes.forward
        bwd += passes.backward
    return out, fwd, bwd


# --- timed runs, each in a child process ------------------------------------------------------


def _timed(adapter: Any, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    """``fn()``, its wall time, and the time spent in the network's forward passes, in its
    backward passes, and in encoding."""
    import torch

    spent = {"forward_s": 0.0, "backward_s": 0.0, "encode_s": 0.0}
    saved = adapter.eps, adapter.encode, torch.autograd.grad, torch.Tensor.backward

    def timed(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return call

    adapter.eps, adapter.encode = timed("forward_s", saved[0]), timed("encode_s", saved[1])
    torch.autograd.grad = timed("backward_s", saved[2])
    torch.Tensor.backward = timed("backward_s", saved[3])  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start, spent
    finally:
        adapter.eps, adapter.encode, torch.autograd.grad = saved[:3]
        torch.Tensor.backward = saved[3]  # type: ignore[method-assign]


def child_run(kind: str, source: str, items: list[Any], batch_size: int, seed: int,
              features: str = "verdict") -> dict[str, Any]:
    import torch

    from cdi.features import FeatureExtractor
    from cdi.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    adapter = load_model(source)

    def run(some: list[Any]) -> tuple[np.ndarray, int, int]:
        if kind == "baseline":
            return published_features(adapter, some, seed, batch_size)
        ex = FeatureExtractor(adapter, feature_set=features, seed=seed, batch_size=batch_size)
        values = ex.extract(some)
        return values, ex.passes.forward, ex.passes.backward

    run(items[:2])  # warm-up: first-call costs paid outside the timed run
    (values, fwd, bwd), seconds, spent = _timed(adapter, lambda: run(items))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"values": values, "seconds": seconds, "forward": fwd, "backward": bwd,
            "peak_mib": peak_kib / 1024, **spent}


def _in_child(*args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(child_run, args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="digits-memorised", help=f"a shipped model, a directory, or {UNET_30M}")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating, best kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", choices=["verdict", "all", "gradient-free"], default="verdict",
                    help="the extractor's feature set (default verdict: what the default audit reads)")
    ap.add_argument("--verdicts", nargs="+", metavar="MODEL",
                    help="instead: compare the default audit's verdict with an all-features audit's on these models")
    ap.add_argument("--per-set", type=int, default=20, help="--verdicts: images of each set")
    args = ap.parse_args(argv)
    if args.verdicts:
        return compare_verdicts(args.verdicts, args.per_set, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        source = args.model
        if source == UNET_30M:
            source = str(build_unet_30m(Path(tmp) / UNET_30M))
            items = random_inputs(3, 64, args.images)
        elif Path(source).exists():
            from cdi.models import load_model

            a = load_model(source)
            items = random_inputs(a.image_channels, a.image_size, args.images)
        else:
            items = zoo_inputs(source, args.images)
        n = len(items)
        print(f"model {args.model}, {n} images, batch {args.batch_size}; each run a fresh process")
        best: dict[str, dict[str, Any]] = {}
        for r in range(args.repeats):
            for kind in ("baseline", "extractor"):
                res = _in_child(kind, source, items, args.batch_size, args.seed, args.features)
                print(f"  run {r + 1} {kind:9s} {n / res['seconds']:8.3f} images/s  "
                      f"peak RSS {res['peak_mib']:7.0f} MiB", flush=True)
                if kind not in best or res["seconds"] < best[kind]["seconds"]:
                    best[kind] = {**res, "peak_mib": min(res["peak_mib"], best.get(kind, res)["peak_mib"])}

    base, ours = best["baseline"], best["extractor"]
    for kind, res in best.items():
        s = res["seconds"]
        other = 1 - (res["forward_s"] + res["backward_s"] + res["encode_s"]) / s
        print(f"{kind:10s} {n / s:8.3f} images/s   {res['forward'] / n:5.1f} forward + {res['backward'] / n:4.1f} "
              f"backward passes per image = {equivalents(res, base) / n:5.1f} forward-pass equivalents   "
              f"peak RSS {res['peak_mib']:.0f} MiB\n{'':10s} time: forward passes "
              f"{res['forward_s'] / s:.0%}, backward passes {res['backward_s'] / s:.0%}, "
              f"encoding {res['encode_s'] / s:.0%}, other {other:.0%}")
    print(f"speed-up   {base['seconds'] / ours['seconds']:.2f}x ({args.features} against all 26 the published way)   "
          f"peak RSS ratio (extractor / baseline) {ours['peak_mib'] / base['peak_mib']:.2f}")
    # NO differs by design (per-sample gradient descent against the batch's L-BFGS-B), and DL
    # averages the published code's 5 draws in the baseline, the default's 9 in the extractor.
    computed = [c for c in range(1, 24) if not np.isnan(ours["values"][:, c]).any()]
    a, b = base["values"][:, computed], ours["values"][:, computed]
    if not np.allclose(a, b, rtol=1e-3, atol=1e-4):
        print(f"FAIL: features differ from the baseline's (max relative {np.nanmax(np.abs(b / a - 1)):.2e})",
              file=sys.stderr)
        return 1
    print(f"the {len(computed)} features computed but DL and NO agree with the baseline's (rtol 1e-3)")
    return 0


def equivalents(res: dict[str, Any], cost_of: dict[str, Any]) -> float:
    """Forward-pass equivalents of a run: backward passes at their measured cost relative to a forward pass.

    The cost is measured on ``cost_of`` (a run that made both kinds; the baseline always does).
    """
    per_fwd = cost_of["forward_s"] / max(cost_of["forward"], 1)
    per_bwd = cost_of["backward_s"] / max(cost_of["backward"], 1)
    ratio = per_bwd / per_fwd if per_fwd > 0 else 1.0
    return float(res["forward"] + ratio * res["backward"])


def compare_verdicts(models: list[str], per_set: int, seed: int) -> int:
    """The default audit against the same audit with all 26 features, on each shipped model."""
    from cdi import zoo
    from cdi.audit import AuditOptions, audit
    from cdi.images import ImageFile
    from cdi.models import load_model

    failed = 0
    for name in models:
        model = zoo.get(name)

        def files(indices: Any, model: Any = model, name: str = name) -> list[ImageFile]:
            out = []
            for i in indices:
                buf = io.BytesIO()
                model.image(i).save(buf, format="PNG")
                out.append(ImageFile(f"{name}-{i}.png", buf.getvalue()))
            return out

        p, u = files(model.members[:per_set]), files(model.held_out[:per_set])
        labels = None
        if model.conditioning == "class":
            labels = {f.name: model.label(int(f.name.rsplit("-", 1)[1][:-4])) for f in p + u}
        adapter = load_model(name)
        results = {}
        for features in ("verdict", "all"):
            # Photo tiles of one sky look alike: the perceptual duplicate search, which would
            # exclude them, is off (exact duplicates are still excluded); it is not compared here.
            opts = AuditOptions(features=features, seed=seed, duplicate_threshold=-1.0)  # type: ignore[arg-type]
            results[features] = audit(p, u, adapter, options=opts, labels=labels)
        d, a = results["verdict"], results["all"]
        cols = d.options.columns
        same_features = all(np.array_equal(x.features[cols], y.features[cols])
                            for x, y in zip(d.images_p + d.images_u, a.images_p + a.images_u, strict=True))
        n = len(p) + len(u)
        same = d.outcome == a.outcome and d.p_value == a.p_value and same_features
        failed += not same
        print(f"{name:18s} default: {d.outcome:13s} p = {d.p_value:.6g}, {d.forward_passes / n:5.1f} forward + "
              f"{d.backward_passes / n:4.1f} backward per image   all: {a.outcome:13s} p = {a.p_value:.6g}, "
              f"{a.forward_passes / n:5.1f} + {a.backward_passes / n:4.1f}   "
              f"read features bit-identical: {same_features}   {'SAME' if same else 'DIFFERENT'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
