"""What a report records of the software that produced it: the package's and its stack's versions.

A leaf module (standard library only): the audit writes these versions into a result and the
report's recomputation compares them with the running ones, without either importing the other.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["STACK", "__version__", "versions"]

#: This package's version (``cdi.__version__``).
__version__ = "0.1.0"

#: The packages whose versions can change a result, as their distributions are named.
STACK = ("torch", "diffusers", "transformers", "scikit-learn", "scipy", "numpy", "pillow")


def versions() -> dict[str, str]:
    """``{"cdi-audit": …, "python": …, <package>: <version or "absent">}`` of the running process."""
    out = {"cdi-audit": __version__, "python": platform.python_version()}
    for pkg in STACK:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out
