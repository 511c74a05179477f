"""The ``cdi`` command.

Library commands live here; the service registers its own (``serve``, ``worker``,
``admin``, ``submit``…) through the ``cdi.commands`` entry-point group, so this package
never imports the service.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cdi.errors import CdiError, InputError


class ProgressBar:
    """A tqdm bar on stderr, fed with (done, total) calls."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, leave=True)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _conditions_for(names: Sequence[str], captions: str | None, labels: str | None) -> list[Any] | None:
    from cdi.conditions import read_conditions

    if captions and labels:
        raise InputError("give either --captions or --labels, not both")
    if not captions and not labels:
        return None
    mapping = read_conditions(captions or labels or "", "caption" if captions else "label")
    if labels:
        missing = [n for n in names if n not in mapping]
        if missing:
            raise InputError(f"no label for {len(missing)} image(s), e.g. {missing[0]}")
    return [mapping.get(n) for n in names]


def cmd_features(args: argparse.Namespace) -> int:
    from cdi.features import FEATURE_NAMES, FeatureExtractor
    from cdi.images import ImageFile, list_image_files
    from cdi.models import load_model

    paths = list_image_files(args.images)
    if not paths:
        raise InputError(f"no image files in {args.images}")
    files = [ImageFile.read(p) for p in paths]
    conditions = _conditions_for([f.name for f in files], args.captions, args.labels)
    adapter = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype)
    extractor = FeatureExtractor(
        adapter, feature_set=args.features, seed=args.seed, batch_size=args.batch_size
    )
    result = extractor.extract_files(files, conditions, progress=ProgressBar("features"))
    for err in result.failures:
        print(f"skipped {err.name}: {err.reason}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "sha256", *FEATURE_NAMES])
        for row in result.rows:
            writer.writerow([row.name, row.sha256, *(f"{v:.9g}" for v in row.values)])
    n = len(result.rows)
    print(
        f"{n} image(s) → {out} ({len(result.failures)} skipped); "
        f"{result.passes.forward / max(n, 1):.1f} forward and "
        f"{result.passes.backward / max(n, 1):.1f} backward passes per image",
        file=sys.stderr,
    )
    return 0 if n else 2


def cmd_models(args: argparse.Namespace) -> int:
    from cdi import zoo

    for m in zoo.list_models():
        print(f"{m.name:20s} {m.family:8s} {m.image_size}px  {m.description}")
        print(f"{'':20s} {m.path}")
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory, hub id, or shipped model name")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--features", choices=["all", "gradient-free"], default="all")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--captions", help="CSV (file,caption) or JSONL of captions, for text models")
    p.add_argument("--labels", help="CSV (file,label) or JSONL of class labels, for class models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdi", description="Copyrighted Data Identification for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("features", help="compute the 26 CDI features of a folder of images")
    _add_model_options(p)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("models", help="list the models that ship with the project")
    p.set_defaults(func=cmd_models)

    for register in _plugin_registrars():
        register(sub)
    return parser


def _plugin_registrars() -> list[Callable[[Any], None]]:
    out = []
    for ep in entry_points(group="cdi.commands"):
        try:
            out.append(ep.load())
        except ImportError:  # the service's extras are not installed
            continue
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CdiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
