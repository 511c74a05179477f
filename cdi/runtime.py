"""How features are computed, declared once for the library, the command line and the service.

The model's floating-point types and the batch size. Pure Python (no torch), so that the
command line and the service's settings read them without loading a model.
"""

from __future__ import annotations

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_DTYPE", "DTYPES"]

#: The floating-point types a model can be loaded in.
DTYPES = ("float32", "float16", "bfloat16")
#: Models load in float32 unless told otherwise (the verdicts are measured in it).
DEFAULT_DTYPE = "float32"
#: Images per batch on the CPU, and the first guess on an accelerator before its memory is known.
DEFAULT_BATCH_SIZE = 32
