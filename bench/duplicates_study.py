"""Duplicates study: does the near-duplicate rule link distinct images, and does it catch copies?

Data sets of *distinct but similar* images, all built here without a download:

- ``digits``: the 1,797 handwritten digits the shipped models are trained on (scikit-learn),
  at 32×32: many drawings of one digit are almost alike;
- ``glyphs``: letters, accented letters, Greek, Cyrillic, arrows and symbols rendered black on
  white at 48×48 from the DejaVu fonts that ship with matplotlib (line art: 'é' against 'è');
- ``icons``: simple shapes drawn with Pillow (circles, squares, triangles, stars, arrows,
  rings) at 64×64 with small changes of size, position, stroke and colour;
- ``products``: synthetic product photos on white, 128×128: one kind of sneaker-like
  silhouette with small changes of proportions, colour, sole, stripe and lighting, the way a
  shop photographs a range of similar shoes;
- ``photos``: 96×96 tiles of scikit-learn's two sample photographs at different places and
  scales (textured tiles only; tiles that share pixels are never paired).

Pairs of images that are pixel-identical after decoding (the same glyph in two scripts)
are not distinct and are left out of the false-link count; their number is printed.

True copies of a sample of those images (and of the two full photographs): JPEG at quality
95/75/50/30, JPEG 85 saved as PNG, resized to ½, ¾ and 2×, cropped 2 % and 5 % per side or
5 % from two sides, brightened by 10 levels or 10 %, pixels rotated with an EXIF orientation
tag (and the reverse), and two combinations.

For each rule it prints, per data set, the distinct pairs, how many were linked, the
false-link rate per pair with its 95 % Clopper–Pearson upper bound and the share of images
linked to at least one other; then, per copy kind, the share of copies caught; then the cost
per image (fingerprint) and per pair.

    python bench/duplicates_study.py [--sets digits glyphs icons products photos] [--max-images 600]
        [--copies 30] [--thresholds 4 6 8]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from scipy.stats import beta

# --- distinct look-alike images -----------------------------------------------------------


def digit_images() -> list[Image.Image]:
    """The 1,797 digits of the shipped models at 32×32 (as the zoo exports them)."""
    from cdi.zoo import digits

    return [digits.image(i, 32) for i in range(digits.count())]


def _font_paths() -> list[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
    return [root / n for n in names if (root / n).is_file()]


#: Latin-1 and Latin Extended-A letters, Greek, Cyrillic, arrows, maths and box symbols.
_CODE_POINTS = [
    *range(0x21, 0x7F), *range(0xC0, 0x180), *range(0x391, 0x3CA), *range(0x410, 0x450),
    *range(0x2190, 0x21A0), *range(0x2200, 0x2240), *range(0x25A0, 0x25D0),
]


def glyph_images(size: int = 48) -> list[Image.Image]:
    """Characters of four DejaVu faces, black on white, centred at ``size``×``size``."""
    out = []
    for path in _font_paths():
        font = ImageFont.truetype(str(path), int(size * 0.7))
        missing = _glyph(chr(0xE000), font, size)  # a private-use code point: the face's "missing" box
        for cp in _CODE_POINTS:
            img = _glyph(chr(cp), font, size)
            if img is None or (missing is not None and img.tobytes() == missing.tobytes()):
                continue
            out.append(img)
    return out


def _glyph(ch: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), ch, font=font)
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    x = (size - (box[2] - box[0])) / 2 - box[0]
    y = (size - (box[3] - box[1])) / 2 - box[1]
    draw.text((x, y), ch, fill=0, font=font)
    return None if np.asarray(img).min() == 255 else img


def _star(cx: float, cy: float, r: float, points: int, inner: float, turn: float) -> list[tuple[float, float]]:
    angles = turn + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return [(cx + rr * np.sin(a), cy - rr * np.cos(a)) for a, rr in zip(angles, radii, strict=True)]


def icon_images(n: int = 1200, size: int = 64, seed: int = 1) -> list[Image.Image]:
    """Simple flat icons: six shapes, each drawn with small random changes."""
    rng = np.random.default_rng(seed)
    palette = [(30, 30, 30), (200, 40, 40), (40, 90, 200), (40, 150, 60), (230, 160, 20)]
    out = []
    for i in range(n):
        shape = i % 6
        img = Image.new("RGB", (size * 4, size * 4), (255, 255, 255))  # drawn 4× then reduced: anti-aliased
        d = ImageDraw.Draw(img)
        s = size * 4
        c = s / 2 + rng.normal(0, s * 0.03, 2)
        r = s * rng.uniform(0.28, 0.38)
        colour = palette[int(rng.integers(len(palette)))]
        width = int(s * rng.uniform(0.03, 0.08))
        filled = bool(rng.integers(2))
        box = (c[0] - r, c[1] - r, c[0] + r, c[1] + r)
        if shape == 0:
            d.ellipse(box, fill=colour if filled else None, outline=colour, width=width)
        elif shape == 1:
            d.rounded_rectangle(box, radius=r * rng.uniform(0, 0.4), fill=colour if filled else None,
                                outline=colour, width=width)
        elif shape == 2:
            pts = _star(c[0], c[1], r, 3, 0.5, rng.normal(0, 0.1))[::2]
            d.polygon(pts, fill=colour if filled else None, outline=colour, width=width)
        elif shape == 3:
            pts = _star(c[0], c[1], r, int(rng.integers(5, 7)), rng.uniform(0.4, 0.55), rng.normal(0, 0.1))
            d.polygon(pts, fill=colour if filled else None, outline=colour, width=width)
        elif shape == 4:  # arrow to the right
            t = r * rng.uniform(0.25, 0.4)
            head = c[0] + r * rng.uniform(0.1, 0.3)
            pts = [(c[0] - r, c[1] - t), (head, c[1] - t), (head, c[1] - r), (c[0] + r, c[1]),
                   (head, c[1] + r), (head, c[1] + t), (c[0] - r, c[1] + t)]
            d.polygon(pts, fill=colour if filled else None, outline=colour, width=width)
        else:  # ring with a dot
            d.ellipse(box, outline=colour, width=max(width, int(s * 0.06)))
            q = r * rng.uniform(0.2, 0.4)
            d.ellipse((c[0] - q, c[1] - q, c[0] + q, c[1] + q), fill=colour)
        out.append(img.resize((size, size), Image.Resampling.LANCZOS))
    return out


def product_images(n: int = 750, size: int = 128, seed: int = 2) -> list[Image.Image]:
    """Sneaker-like product shots on white: one silhouette, small changes of everything."""
    rng = np.random.default_rng(seed)
    out = []
    s = size * 2
    for _ in range(n):
        img = Image.new("RGB", (s, s), (255, 255, 255))
        d = ImageDraw.Draw(img)
        # The upper: a toe-to-heel curve; proportions vary a little.
        x0, x1 = s * rng.uniform(0.08, 0.14), s * rng.uniform(0.86, 0.92)
        sole_y = s * rng.uniform(0.66, 0.72)
        top = s * rng.uniform(0.30, 0.38)
        toe_h = s * rng.uniform(0.50, 0.56)
        collar = s * rng.uniform(0.55, 0.68)
        upper = [(x0, sole_y), (x0, toe_h), (s * 0.35, s * rng.uniform(0.44, 0.5)),
                 (collar - s * 0.08, top + s * 0.04), (collar, top), (x1 - s * 0.02, top + s * 0.02),
                 (x1, sole_y)]
        base = np.array([rng.uniform(40, 235) for _ in range(3)])
        # Shops photograph ranges: most shoes are white, grey or black.
        if rng.random() < 0.6:
            base = np.full(3, rng.choice([235.0, 200.0, 60.0, 30.0])) + rng.normal(0, 6, 3)
        colour = tuple(int(v) for v in np.clip(base, 0, 255))
        d.polygon(upper, fill=colour, outline=tuple(int(v * 0.7) for v in colour))
        sole_h = s * rng.uniform(0.05, 0.09)
        sole = tuple(int(v) for v in np.clip(rng.normal(240, 10, 3), 0, 255))
        d.rounded_rectangle((x0 - s * 0.01, sole_y - s * 0.01, x1 + s * 0.01, sole_y + sole_h),
                            radius=sole_h / 2, fill=sole, outline=(150, 150, 150))
        # A side stripe, laces, a heel tab: each present or not, placed a little differently.
        if rng.random() < 0.7:
            sc = tuple(int(v) for v in np.clip(rng.uniform(0, 255, 3), 0, 255))
            a = s * rng.uniform(0.3, 0.45)
            d.line([(a, sole_y - s * 0.02), (a + s * rng.uniform(0.15, 0.25), top + s * 0.1)], fill=sc,
                   width=int(s * rng.uniform(0.02, 0.05)))
        for k in range(int(rng.integers(3, 6))):
            lx = s * 0.38 + k * s * 0.045
            ly = s * 0.45 - k * s * 0.025
            d.line([(lx, ly), (lx + s * 0.04, ly - s * 0.02)], fill=(250, 250, 250), width=max(2, s // 100))
        if rng.random() < 0.5:
            d.rectangle((x1 - s * 0.05, top, x1, top + s * 0.08), fill=tuple(int(v * 0.8) for v in colour))
        img = img.filter(ImageFilter.GaussianBlur(s * 0.002))
        arr = np.asarray(img, dtype=np.float64)
        # Lighting from a side and sensor noise, as in a photograph.
        ramp = np.linspace(-1, 1, s)[None, :, None] * rng.uniform(-8, 8)
        arr = arr + ramp + rng.normal(0, 2.0, arr.shape)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        out.append(img.resize((size, size), Image.Resampling.LANCZOS))
    return out


def _sample_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(np.asarray(a)) for a in load_sample_images().images]


def photo_tiles(size: int = 96) -> tuple[list[Image.Image], list[tuple[int, int, int, int, int]]]:
    """Textured tiles of the sample photographs, with (photo, left, top, right, bottom)."""
    tiles, boxes = [], []
    for k, photo in enumerate(_sample_photos()):
        w, h = photo.size
        for side in (96, 128, 160):
            for top in range(0, h - side + 1, side // 2):
                for left in range(0, w - side + 1, side // 2):
                    tile = photo.crop((left, top, left + side, top + side)).resize((size, size),
                                                                                  Image.Resampling.LANCZOS)
                    if np.asarray(tile.convert("L"), dtype=np.float64).std() < 12:
                        continue  # sky and blur: nothing to tell tiles apart by
                    tiles.append(tile)
                    boxes.append((k, left, top, left + side, top + side))
    return tiles, boxes


# --- true copies ----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    return encode(img.convert("RGB") if img.mode not in ("L", "RGB") else img, "JPEG", quality=quality)


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom))))


def _resize(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)


def _with_orientation(img: Image.Image) -> bytes:
    """The pixels stored turned a quarter, with the EXIF tag (6) that turns them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.transpose(Image.Transpose.ROTATE_90).convert("RGB"), "JPEG", quality=95, exif=exif)


#: Copy kinds: a name and the file bytes of the copy made from the original image.
COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg q95": lambda im: _jpeg(im, 95),
    "jpeg q75": lambda im: _jpeg(im, 75),
    "jpeg q50": lambda im: _jpeg(im, 50),
    "jpeg q30": lambda im: _jpeg(im, 30),
    "jpeg q85 -> png": lambda im: encode(_decoded(_jpeg(im, 85))),
    "resize 1/2": lambda im: encode(_resize(im, 0.5)),
    "resize 3/4": lambda im: encode(_resize(im, 0.75)),
    "resize 2x": lambda im: encode(_resize(im, 2.0)),
    "crop 2% each side": lambda im: encode(_crop(im, 0.02, 0.02, 0.02, 0.02)),
    "crop 5% each side": lambda im: encode(_crop(im, 0.05, 0.05, 0.05, 0.05)),
    "crop 5% left+top": lambda im: encode(_crop(im, 0.05, 0.05, 0.0, 0.0)),
    "brightness +10": lambda im: encode(Image.eval(im, lambda v: min(255, v + 10))),
    "brightness x1.1": lambda im: encode(ImageEnhance.Brightness(im).enhance(1.1)),
    "exif orientation added": _with_orientation,
    "exif orientation removed": lambda im: encode(im),  # compared against the tagged file
    "resize 3/4 + jpeg q75": lambda im: _jpeg(_resize(im, 0.75), 75),
    "crop 3% + jpeg q75": lambda im: _jpeg(_crop(im, 0.03, 0.03, 0.03, 0.03), 75),
}


def copy_pairs(originals: list[Image.Image]) -> Iterator[tuple[str, bytes, bytes]]:
    """(kind, original file, copy file) for every original and copy kind."""
    for img in originals:
        png = encode(img)
        for kind, make in COPIES.items():
            if kind == "exif orientation removed":
                yield kind, _with_orientation(img), make(img)
            else:
                yield kind, png, make(img)


# --- measurement ------------------------------------------------------------------------------


def data_set(name: str) -> tuple[list[Image.Image], np.ndarray | None]:
    """The images of a data set and, where some pairs are not distinct pictures, a mask of those."""
    if name == "digits":
        return digit_images(), None
    if name == "glyphs":
        return glyph_images(), None
    if name == "icons":
        return icon_images(), None
    if name == "products":
        return product_images(), None
    if name == "photos":
        tiles, boxes = photo_tiles()
        b = np.array(boxes)
        same = b[:, None, 0] == b[None, :, 0]
        overlap = (np.minimum(b[:, None, 3], b[None, :, 3]) > np.maximum(b[:, None, 1], b[None, :, 1])) & (
            np.minimum(b[:, None, 4], b[None, :, 4]) > np.maximum(b[:, None, 2], b[None, :, 2]))
        return tiles, same & overlap
    raise SystemExit(f"unknown data set {name!r}")


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound of a rate seen k times in n."""
    return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))


def _fingerprints(images: list[Image.Image], prefix: str) -> tuple[list, float]:
    from cdi.controls import fingerprint
    from cdi.images import open_image

    files = [encode(im) for im in images]
    t0 = time.perf_counter()
    prints = [fingerprint(f"{prefix}{i}", f, open_image(f, f"{prefix}{i}")) for i, f in enumerate(files)]
    return prints, (time.perf_counter() - t0) / max(1, len(files))


def study_distinct(name: str, rules: dict[str, float], max_images: int, seed: int = 0) -> dict[str, object]:
    from cdi import controls

    images, not_distinct = data_set(name)
    if len(images) > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(images), size=max_images, replace=False))
        images = [images[int(i)] for i in pick]
        if not_distinct is not None:
            not_distinct = not_distinct[np.ix_(pick, pick)]
    prints, per_image = _fingerprints(images, name)
    n = len(prints)
    pixels = [np.asarray(im.convert("RGB")).tobytes() + bytes(str(im.size), "ascii") for im in images]
    same = np.zeros((n, n), dtype=bool)
    groups: dict[bytes, list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(p, []).append(i)
    for members in groups.values():
        for a in members:
            same[a, members] = True
    if not_distinct is not None:
        same |= not_distinct
    iu = np.triu_indices(n, 1)
    excluded = same[iu]
    n_pairs = int((~excluded).sum())
    n_identical = sum(len(m) * (len(m) - 1) // 2 for m in groups.values())

    # The former rule: perceptual hashes within 4 bits.
    hashes = np.array([p.phash for p in prints], dtype=np.uint64)
    old = np.zeros((n, n), dtype=bool)
    for start in range(0, n, 512):
        old[start : start + 512] = controls._hamming_matrix(hashes[start : start + 512], hashes) <= 4
    old_links = old[iu] & ~excluded

    # The new rule: sketch candidates, then aligned verification of each candidate.
    t0 = time.perf_counter()
    cands = controls.candidate_pairs(prints)
    t_cand = time.perf_counter() - t0
    cands = np.array([(a, b) for a, b in cands.tolist() if not same[a, b]], dtype=np.intp).reshape(-1, 2)
    t0 = time.perf_counter()
    aligned = [controls.align(prints[a].pixels(), prints[b].pixels()) for a, b in cands.tolist()]
    t_verify = time.perf_counter() - t0
    diff = np.array([al.difference for al in aligned])
    block = np.array([al.block_difference for al in aligned])
    out: dict[str, object] = {
        "name": name, "images": n, "pairs": n_pairs, "identical": n_identical, "per_image": per_image,
        "candidates": len(cands), "candidate_time_per_pair": t_cand / max(1, n * (n - 1) // 2),
        "verify_time": t_verify / max(1, len(cands)),
        "old": _rates(old_links.sum(), old_links, iu, n, n_pairs),
    }
    for label, threshold in rules.items():
        linked = np.array([al.matches(threshold) for al in aligned], dtype=bool)
        matrix = np.zeros((n, n), dtype=bool)
        matrix[cands[linked, 0], cands[linked, 1]] = True
        out[label] = _rates(int(linked.sum()), matrix[iu], iu, n, n_pairs)
    order = np.argsort(diff)[:5]
    out["closest"] = [(int(cands[k, 0]), int(cands[k, 1]), round(float(diff[k]), 1), round(float(block[k]), 1))
                      for k in order]
    return out


def _rates(k: int, links: np.ndarray, iu: tuple[np.ndarray, np.ndarray], n: int, n_pairs: int) -> dict[str, float]:
    touched = np.zeros(n, dtype=bool)
    touched[iu[0][links]] = True
    touched[iu[1][links]] = True
    return {"links": int(k), "rate": k / n_pairs, "upper": upper_bound(int(k), n_pairs),
            "images_linked": float(touched.mean())}


def study_copies(originals: list[Image.Image], rules: dict[str, float]) -> dict[str, dict[str, float]]:
    from cdi import controls
    from cdi.controls import fingerprint
    from cdi.images import open_image

    caught: dict[str, dict[str, list[bool]]] = {}
    diffs: dict[str, list[float]] = {}
    for kind, original, copy in copy_pairs(originals):
        a = fingerprint("a", original, open_image(original, "a"))
        b = fingerprint("b", copy, open_image(copy, "b"))
        row = caught.setdefault(kind, {})
        exact = a.sha256 == b.sha256
        row.setdefault("old", []).append(exact or controls.hamming_distance(a.phash, b.phash) <= 4)
        candidate = len(controls.candidate_pairs([a, b])) == 1
        al = controls.align(a.pixels(), b.pixels())
        diffs.setdefault(kind, []).append(al.difference if candidate else np.inf)
        for label, threshold in rules.items():
            ok = candidate and al.matches(threshold)
            row.setdefault(label, []).append(exact or ok)
    out = {kind: {label: float(np.mean(v)) for label, v in row.items()} for kind, row in caught.items()}
    for kind, d in diffs.items():
        out[kind]["median difference"] = float(np.median(d))
        out[kind]["95th pct difference"] = float(np.percentile(d, 95))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["digits", "glyphs", "icons", "products", "photos"])
    parser.add_argument("--copies", type=int, default=30, help="originals per data set for the copy study")
    parser.add_argument("--max-images", type=int, default=600, help="images drawn from each data set")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="difference thresholds to compare (default: the shipped one)")
    args = parser.parse_args(argv)
    from cdi import controls

    thresholds = args.thresholds or [controls.DEFAULT_DIFFERENCE_THRESHOLD]
    rules = {f"verified <= {t:g}": t for t in thresholds}
    print(f"candidates: 8x8 RGB sketches within {controls.DEFAULT_CANDIDATE_DISTANCE:g} levels; "
          f"old rule: 64-bit pHash within 4 bits\n")
    print("distinct look-alike images: links between different pictures")
    originals: list[Image.Image] = []
    rng = np.random.default_rng(0)
    for name in args.sets:
        r = study_distinct(name, rules, args.max_images)
        print(f"\n{name}: {r['images']} images, {r['pairs']:,} distinct pairs "
              f"({r['identical']} pixel-identical pairs left out), {r['candidates']:,} candidates")
        for label in ("old", *rules):
            x = r[label]
            assert isinstance(x, dict)
            print(f"  {label:18s} links {x['links']:6d}  rate {x['rate']:.2e}  (95% upper {x['upper']:.2e})  "
                  f"images linked {100 * x['images_linked']:.2f}%")
        print(f"  closest candidates (i, j, difference, block): {r['closest']}")
        print(f"  time: fingerprint {1e3 * float(r['per_image']):.2f} ms/image, candidate search "  # type: ignore[arg-type]
              f"{1e9 * float(r['candidate_time_per_pair']):.1f} ns/pair, verification "  # type: ignore[arg-type]
              f"{1e3 * float(r['verify_time']):.2f} ms/candidate")  # type: ignore[arg-type]
        images, _ = data_set(name)
        pick = rng.choice(len(images), size=min(args.copies, len(images)), replace=False)
        originals += [images[int(i)] for i in pick]
    originals += _sample_photos()
    print(f"\ntrue copies of {len(originals)} images (the sets' samples and the two full photographs): share caught")
    copies = study_copies(originals, rules)
    labels = ["old", *rules, "median difference", "95th pct difference"]
    print("  " + f"{'copy kind':26s}" + "".join(f"{lab:>22s}" for lab in labels))
    for kind, row in copies.items():
        print("  " + f"{kind:26s}" + "".join(f"{row[lab]:22.3f}" for lab in labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
