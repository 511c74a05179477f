"""The models that ship with the project, trained here on image data that ships with scikit-learn.

Each lives in ``cdi/zoo/models/<name>/`` in diffusers layout, with a ``manifest.json``
that lists which images it was trained on (members) and which it never saw (held out),
by index into its data set (``manifest["dataset"]``, a key of :data:`DATASETS`).
``scripts/train_zoo.py`` regenerates them. This module reads JSON only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from cdi.zoo import digits, photos

MODELS_DIR = Path(__file__).parent / "models"



class DataSet(Protocol):
    """An image source that ships inside an installed package (a module of this package)."""

    #: Exported file names are ``<PREFIX>-<index>.png``; every image has CHANNELS channels.
    PREFIX: str
    CHANNELS: int

    def count(self) -> int: ...

    def image(self, index: int, size: int) -> Image.Image: ...

    def label(self, index: int) -> int: ...


#: Manifest ``dataset`` → the module that rebuilds its images from package data.
DATASETS: dict[str, DataSet] = {"sklearn-digits": digits, "sklearn-sample-photos": photos}


@dataclass(frozen=True)
class ZooModel:
    name: str
    path: Path
    description: str
    family: str
    image_size: int
    conditioning: str
    members: tuple[int, ...]
    held_out: tuple[int, ...]
    dataset: str = "sklearn-digits"
    image_channels: int = 1
    #: The whole manifest.json (training settings, measured AUC, ...).
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def load(cls, path: Path) -> ZooModel:
        m = json.loads((path / "manifest.json").read_text())
        return cls(
            name=m["name"], path=path, description=m["description"], family=m["family"],
            image_size=int(m["image_size"]), conditioning=m["conditioning"],
            members=tuple(m["members"]), held_out=tuple(m["held_out"]),
            dataset=m.get("dataset", "sklearn-digits"), image_channels=int(m.get("image_channels", 1)),
            manifest=m,
        )

    @staticmethod
    def file_name(index: int, dataset: str = "sklearn-digits") -> str:
        """The exported file name of image ``index`` of ``dataset``, e.g. ``digit-0042.png``."""
        return f"{_source(dataset).PREFIX}-{index:04d}.png"

    def image(self, index: int) -> Image.Image:
        """Image ``index`` of the model's data set at the model's resolution (8-bit L or RGB)."""
        return _source(self.dataset).image(index, self.image_size)

    def label(self, index: int) -> int:
        """The class of image ``index`` (the digit; for photo tiles, the photograph)."""
        return _source(self.dataset).label(index)

    def export(self, directory: str | Path, members: int = 50, held_out: int = 50) -> tuple[list[Path], list[Path]]:
        """Write the first ``members`` member and ``held_out`` held-out images as PNG files.

        Members go to ``directory/published/`` and held-out images to
        ``directory/unpublished/`` (the roles they play in an audit), named by
        :meth:`file_name` (``digit-<index>.png``, ``tile-<index>.png``), at the model's
        resolution; for class-conditional models ``directory/labels.csv`` (file,label) gives
        every exported image's class.
        """
        if members > len(self.members) or held_out > len(self.held_out):
            raise ValueError(
                f"{self.name} has {len(self.members)} members and {len(self.held_out)} held-out images"
            )
        root = Path(directory)
        out: list[list[Path]] = []
        for folder, indices in (("published", self.members[:members]), ("unpublished", self.held_out[:held_out])):
            d = root / folder
            d.mkdir(parents=True, exist_ok=True)
            paths = []
            for i in indices:
                p = d / self.file_name(i, self.dataset)
                self.image(i).save(p, format="PNG")
                paths.append(p)
            out.append(paths)
        if self.conditioning == "class":
            labels = self.labels_for(self.members[:members] + self.held_out[:held_out])
            (root / "labels.csv").write_text("file,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
        return out[0], out[1]

    def labels_for(self, indices: tuple[int, ...] | list[int]) -> dict[str, int]:
        """File name → class, for the images :meth:`export` writes."""
        return {self.file_name(i, self.dataset): self.label(i) for i in indices}


def _source(dataset: str) -> DataSet:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise KeyError(f"unknown zoo data set {dataset!r} (known: {', '.join(DATASETS)})") from None


def list_models() -> list[ZooModel]:
    if not MODELS_DIR.is_dir():
        return []
    return [ZooModel.load(p) for p in sorted(MODELS_DIR.iterdir()) if (p / "manifest.json").is_file()]


def get(name: str) -> ZooModel:
    """The shipped model called ``name``; ``KeyError`` naming the known ones otherwise."""
    path = MODELS_DIR / name
    if "/" in name or not (path / "manifest.json").is_file():
        known = ", ".join(m.name for m in list_models()) or "none"
        raise KeyError(f"no shipped model named {name!r} (shipped: {known})")
    return ZooModel.load(path)


LORAS_DIR = Path(__file__).parent / "loras"


@dataclass(frozen=True)
class ZooLora:
    """A shipped LoRA fine-tune of a shipped model (``cdi/zoo/loras/<name>/``)."""

    name: str
    path: Path
    description: str
    base: str
    members: tuple[int, ...]
    held_out: tuple[int, ...]
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def lora_path(self) -> Path:
        return self.path / str(self.manifest.get("lora", "lora"))

    @classmethod
    def load(cls, path: Path) -> ZooLora:
        m = json.loads((path / "manifest.json").read_text())
        return cls(name=m["name"], path=path, description=m["description"], base=m["base"],
                   members=tuple(m["members"]), held_out=tuple(m["held_out"]), manifest=m)


def list_loras() -> list[ZooLora]:
    if not LORAS_DIR.is_dir():
        return []
    return [ZooLora.load(p) for p in sorted(LORAS_DIR.iterdir()) if (p / "manifest.json").is_file()]


def get_lora(name: str) -> ZooLora:
    """The shipped LoRA called ``name``; ``KeyError`` naming the known ones otherwise."""
    path = LORAS_DIR / name
    if "/" in name or not (path / "manifest.json").is_file():
        known = ", ".join(m.name for m in list_loras()) or "none"
        raise KeyError(f"no shipped LoRA named {name!r} (shipped: {known})")
    return ZooLora.load(path)
