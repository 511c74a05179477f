"""CDI's 26 membership features (method §4): one family per module, one extractor.

The layout and the configuration import no torch; the extractor (and the names it
exports here) load torch on first use, so torch-free code can use the layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdi.features.config import FeatureConfig
from cdi.features.layout import FEATURE_NAMES, LAYOUT_VERSION, FeatureSet

if TYPE_CHECKING:
    from cdi.features.context import PassCounter
    from cdi.features.extractor import (
        ExtractionInput,
        ExtractionResult,
        FeatureExtractor,
        FeatureRow,
    )

__all__ = [
    "FEATURE_NAMES",
    "LAYOUT_VERSION",
    "ExtractionInput",
    "ExtractionResult",
    "FeatureConfig",
    "FeatureExtractor",
    "FeatureRow",
    "FeatureSet",
    "PassCounter",
]

_LAZY = {
    "PassCounter": "cdi.features.context",
    "ExtractionInput": "cdi.features.extractor",
    "ExtractionResult": "cdi.features.extractor",
    "FeatureExtractor": "cdi.features.extractor",
    "FeatureRow": "cdi.features.extractor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdi.features' has no attribute {name!r}")
