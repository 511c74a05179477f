"""cdi: Copyrighted Data Identification for diffusion models, as a library.

The package computes CDI's per-image membership features from a diffusion model's noise
predictions (:mod:`cdi.features`), loads the supported model families (:mod:`cdi.models`)
and, in later stages, turns features into a verdict. It imports nothing from the web
service or the workers.
"""

__version__ = "0.1.0"
