"""Features and descriptors of every shipped model's images, for the shift study (cached).

Per model, ``<cache>/<name>.npz`` holds the gradient-free features and the descriptors
(:func:`cdi.calibration.image_descriptors`) of every member and held-out image, their
indices and labels, and the same for a bounded subset of them after each transformation of
:data:`TRANSFORMS` (re-encoded, resampled, blurred, darkened, colour-cast), so that the
study can compare a transformed set with an untouched one.

    python bench/shift_cache.py [--models ...] [--subset 300]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from cdi.calibration import image_descriptors
from cdi.features.layout import FeatureSet


def _jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)


def _resample(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR).resize(
        (w, h), Image.Resampling.BICUBIC)


def _warm(img: Image.Image) -> Image.Image:
    if img.mode != "RGB":
        return img
    a = np.asarray(img, dtype=np.float64)
    a = np.clip(a * np.array([1.12, 1.0, 0.85]), 0, 255)
    return Image.fromarray(a.astype(np.uint8), "RGB")


#: Transformations of one set: name → (function of a model-resolution image, colour only).
TRANSFORMS: dict[str, tuple[Callable[[Image.Image], Image.Image], bool]] = {
    "jpeg": (_jpeg, False),
    "resample": (_resample, False),
    "blur": (lambda im: im.filter(ImageFilter.GaussianBlur(0.6)), False),
    "darker": (lambda im: ImageEnhance.Brightness(im).enhance(0.75), False),
    "warm": (_warm, True),
}


def cached(name: str, cache: Path, subset: int = 300, batch_size: int = 64) -> dict[str, np.ndarray]:
    path = cache / f"{name}.npz"
    if path.is_file():
        return dict(np.load(path))
    from cdi import zoo
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput
    from cdi.images import to_model_array
    from cdi.models import load_model

    model = zoo.get(name)
    adapter = load_model(name)
    extractor = FeatureExtractor(adapter, feature_set=FeatureSet.GRADIENT_FREE, seed=0, batch_size=batch_size)

    def run(indices: tuple[int, ...], tag: str, f: Callable[[Image.Image], Image.Image] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        items, desc = [], []
        for i in indices:
            img = model.image(i) if f is None else f(model.image(i))
            px = to_model_array(img, model.image_size, model.image_channels)
            desc.append(image_descriptors(px))
            items.append(ExtractionInput(f"{tag}-{i}", px, model.label(i) if model.conditioning == "class" else None))
        return extractor.extract(items), np.asarray(desc)

    start = time.perf_counter()
    out: dict[str, np.ndarray] = {
        "members_idx": np.asarray(model.members), "held_idx": np.asarray(model.held_out),
        "members_label": np.asarray([model.label(i) for i in model.members]),
        "held_label": np.asarray([model.label(i) for i in model.held_out]),
    }
    out["members"], out["members_desc"] = run(model.members, "m")
    out["held"], out["held_desc"] = run(model.held_out, "h")
    rng = np.random.default_rng(0)
    sub_h = np.sort(rng.permutation(len(model.held_out))[:subset])
    sub_m = np.sort(rng.permutation(len(model.members))[:min(subset, len(model.members))])
    out["sub_held"], out["sub_members"] = sub_h, sub_m
    for tname, (f, colour_only) in TRANSFORMS.items():
        if colour_only and model.image_channels != 3:
            continue
        out[f"{tname}_held"], out[f"{tname}_held_desc"] = run(tuple(model.held_out[i] for i in sub_h), f"{tname}h", f)
        out[f"{tname}_members"], out[f"{tname}_members_desc"] = run(
            tuple(model.members[i] for i in sub_m), f"{tname}m", f)
    print(f"  {name}: features and descriptors in {time.perf_counter() - start:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)  # type: ignore[arg-type]
    return out


def main(argv: list[str] | None = None) -> int:
    from cdi import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m.name for m in zoo.list_models()])
    ap.add_argument("--subset", type=int, default=300, help="held-out (and member) images per transformation")
    ap.add_argument("--cache", type=Path, default=Path(".cdi/shift-cache"))
    args = ap.parse_args(argv)
    for name in args.models:
        cached(name, args.cache, args.subset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
