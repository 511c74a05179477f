"""The worker process's model: loaded once, kept for the next audit of the same model.

A worker holds one model at a time (accelerator memory is the scarce thing); an audit of
another model replaces it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdi.models.base import DiffusionAdapter

log = logging.getLogger(__name__)

_lock = threading.Lock()
_current: tuple[tuple[str, str | None, str], DiffusionAdapter] | None = None
#: How many times this process loaded a model (tests read it).
loads = 0


def get_model(source: str, revision: str | None, device: str) -> DiffusionAdapter:
    global _current, loads
    key = (source, revision, device)
    with _lock:
        if _current is not None and _current[0] == key:
            return _current[1]
        if _current is not None:
            _current = None
            _free_accelerator_memory(device)
        from cdi.models import load_model

        log.info("loading model", extra={"source": source, "revision": revision, "device": device})
        adapter = load_model(source, revision=revision, device=device)
        loads += 1
        _current = (key, adapter)
        return adapter


def _free_accelerator_memory(device: str) -> None:
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
