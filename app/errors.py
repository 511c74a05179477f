"""The service's domain exceptions, each with a stable error code.

Code below the HTTP layer (validation, repositories, the registry) raises these; the API
translates them once, in :mod:`app.api.errors`, into a status code and the JSON body
``{"error": {"code": ..., "message": ...}}``. The class says which kind of failure it is
(and so which HTTP status); the ``code`` says exactly what went wrong and is part of the
wire format: clients may branch on it, so codes are never renamed.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class. ``code`` is stable and machine-readable; ``message`` is for people."""

    default_code = "service_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        self.message = message


class BadInput(ServiceError):
    """The request is malformed or its content unusable (HTTP 422)."""

    default_code = "invalid_request"


class TooLarge(ServiceError):
    """The request exceeds a configured limit (HTTP 413)."""

    default_code = "too_large"


class Unauthorized(ServiceError):
    """No API key, or one that is unknown or revoked (HTTP 401)."""

    default_code = "unauthorized"


class Forbidden(ServiceError):
    """The key is valid but may not do this (HTTP 403)."""

    default_code = "forbidden"


class NotFound(ServiceError):
    """No such resource, or one that belongs to another tenant (HTTP 404)."""

    default_code = "not_found"


class Conflict(ServiceError):
    """The resource exists, or is in a state that forbids the request (HTTP 409)."""

    default_code = "conflict"


class Unavailable(ServiceError):
    """A dependency (database, broker) cannot be reached (HTTP 503)."""

    default_code = "unavailable"


# Stable codes of the upload checks (docs/service.md lists them).
NOT_A_ZIP = "not_a_zip"
CORRUPT_ZIP = "corrupt_zip"
ZIP_BOMB = "zip_bomb"
UNSAFE_PATH = "unsafe_path"
SYMLINK_IN_ZIP = "symlink_in_zip"
NESTED_ARCHIVE = "nested_archive"
NOT_AN_IMAGE = "not_an_image"
UNEXPECTED_MEMBER = "unexpected_member"
DUPLICATE_NAME = "duplicate_name"
MISSING_SET = "missing_image_set"
TOO_FEW_IMAGES = "too_few_images"
TOO_MANY_IMAGES = "too_many_images"
UPLOAD_TOO_LARGE = "upload_too_large"
ARCHIVE_TOO_LARGE = "archive_too_large"
UNKNOWN_MODEL = "unknown_model"
MISSING_API_KEY = "missing_api_key"
INVALID_API_KEY = "invalid_api_key"
CAPTIONS_TOO_LARGE = "captions_too_large"
MALFORMED_CAPTIONS = "malformed_captions"
MALFORMED_LABELS = "malformed_labels"
INVALID_OPTIONS = "invalid_options"
MALFORMED_UPLOAD = "malformed_upload"
INVALID_CHARACTERS = "invalid_characters"
UNKNOWN_PARAMETER = "unknown_parameter"
INVALID_CURSOR = "invalid_cursor"
INVALID_STATE = "invalid_state"
INVALID_CALLBACK_URL = "invalid_callback_url"
IMAGE_TOO_LARGE = "image_too_large"
QUOTA_EXCEEDED = "quota_exceeded"
RATE_LIMITED = "rate_limited"
DATABASE_UNAVAILABLE = "database_unavailable"


class TooMany(ServiceError):
    """A quota or rate limit was reached (HTTP 429); ``retry_after`` says when to try again, seconds."""

    default_code = QUOTA_EXCEEDED

    def __init__(self, message: str, code: str | None = None, retry_after: int = 60,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after
        self.headers = headers or {}
