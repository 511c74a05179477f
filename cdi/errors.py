"""The library's exception hierarchy.

Every error the library raises on purpose derives from :class:`CdiError`, so callers (the
CLI, the web service) can translate it once, at their boundary, into a message or an HTTP
status with a stable code. Each class carries a stable ``code`` string for that purpose.
"""

from __future__ import annotations

from collections.abc import Sequence


class CdiError(Exception):
    """Base class of every error raised on purpose by :mod:`cdi`."""

    code = "cdi_error"


# --- models -----------------------------------------------------------------------------


class ModelError(CdiError):
    """A model reference that cannot be used."""

    code = "model_error"


class ModelNotFoundError(ModelError):
    """The model reference names no directory and no reachable hub repository."""

    code = "model_not_found"


class ModelNotDownloadedError(ModelNotFoundError):
    """A hub model's weights are not in the local cache, and downloading is not allowed."""

    code = "model_not_downloaded"


class UnsupportedModelError(ModelError):
    """The model loads, but its family is not one CDI supports."""

    code = "model_unsupported"


class MalformedModelError(ModelError):
    """The model directory lacks a file or a config entry that its family needs."""

    code = "model_malformed"


class PickledWeightsError(ModelError):
    """The model's weights are pickled (``.bin``, ``.ckpt``, ``.pt``): loading them runs code.

    Refused unless the operator allows it (``--allow-pickle`` or ``CDI_ALLOW_PICKLE=1``).
    """

    code = "model_pickled_weights"


class ModelIdentityError(ModelError):
    """The model's weights cannot be hashed, so the model has no identity to record or cache."""

    code = "model_identity"


# --- images -----------------------------------------------------------------------------


class ImageError(CdiError):
    """An image file that cannot be used. ``name`` is the file it concerns."""

    code = "image_error"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class EmptyImageError(ImageError):
    code = "image_empty"


class NotAnImageError(ImageError):
    code = "image_unrecognised"


class TruncatedImageError(ImageError):
    code = "image_truncated"


class CorruptImageError(ImageError):
    code = "image_corrupt"


class DecompressionBombError(ImageError):
    code = "image_too_large"


# --- inputs to the method ---------------------------------------------------------------


class InputError(CdiError):
    """Invalid arguments or data given to the method (sizes, captions, labels, options).

    ``image_errors``: where the input holds images that cannot be decoded, each one's own
    :class:`ImageError` (with its stable code).
    """

    code = "invalid_input"

    def __init__(self, message: str, image_errors: Sequence[ImageError] = ()) -> None:
        super().__init__(message)
        self.image_errors: tuple[ImageError, ...] = tuple(image_errors)


# --- the device ---------------------------------------------------------------------------


class DeviceMemoryError(CdiError):
    """A single sample's network pass does not fit in the device's memory."""

    code = "device_out_of_memory"
