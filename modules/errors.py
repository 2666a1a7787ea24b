"""The module's own errors, one root and one subclass per kind of failure.

ScorerError
 +-- BadImageError     the bytes are not an image the module will decode
 +-- BadModelError     the file is not a Custom Vision export that can run here
 +-- BadSettingError   a setting or desired property has an invalid value
 +-- BadRequestError   an input message or request is malformed
 +-- FetchError        an image or model could not be fetched
      +-- DownloadError  a model could not be downloaded

Library errors are translated into these where they happen, with ``from``, so
callers handle one family and every message already says what went wrong.
"""


class ScorerError(Exception):
    """Root of every error the module raises on purpose."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class BadImageError(ScorerError):
    """The input is not an image the module accepts."""

    reason = "bad-image"


class BadModelError(ScorerError):
    """The model is not a Custom Vision export that can run here."""

    reason = "bad-model"


class BadSettingError(ScorerError):
    """A setting has a value the module cannot use."""

    reason = "bad-setting"


class BadRequestError(ScorerError):
    """An input message or request is malformed."""

    reason = "bad-request"


class FetchError(ScorerError):
    """A URL could not be fetched, or is not allowed."""

    reason = "fetch-failed"


class DownloadError(FetchError):
    """A model could not be downloaded."""

    reason = "download-failed"


# The HTTP status (also used for direct methods) of each reason that is not a 400.
_STATUS_BY_REASON = {
    "host-not-allowed": 403,
    "path-not-allowed": 403,
    "too-large": 413,
    "unsupported-media-type": 415,
    "scoring-failed": 500,
    "fetch-failed": 502,
    "no-model": 503,
    "shutting-down": 503,
}


def http_status(error: ScorerError) -> int:
    """Return the HTTP status that answers an error: 400 unless it says otherwise."""
    return _STATUS_BY_REASON.get(error.reason, 400)
