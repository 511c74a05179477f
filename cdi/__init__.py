"""cdi: was a diffusion model trained on these images? CDI answers with a p-value.

A data owner gives two sets of images from one source: P, published (suspected to be in the
model's training data), and U, never published. :func:`run_audit` computes CDI's membership
features of every image from the model's noise predictions, scores them, tests whether P
scores higher than U, runs the controls and returns the verdict (``used``,
``not_detected`` or ``inconclusive``) with its p-value::

    import cdi

    result = cdi.run_audit("digits-memorised", "demo/published", "demo/unpublished")
    print(result.outcome, result.p_value, result.verdict.reason)
    cdi.save_report(result, "report.json", pdf="report.pdf")

The public functions: :func:`run_audit`, :func:`extract_features` (the 26 features of each
image),
:func:`load_model`, :func:`save_report`, :func:`verify` and :func:`recompute` (check a
report, rerun its test from the report alone). They are imported on first use, so that
``import cdi`` stays cheap. The package imports nothing from the web service or the workers;
the service's HTTP client is :mod:`app.client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdi.provenance import __version__

__all__ = ["__version__", "extract_features", "load_model", "recompute", "run_audit", "save_report", "verify"]

if TYPE_CHECKING:
    from cdi.api import extract_features, load_model, recompute, run_audit, save_report, verify


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cdi import api

        return getattr(api, name)
    raise AttributeError(f"module 'cdi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
