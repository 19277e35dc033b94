"""The service's typed exception tree. The HTTP layer maps each class to a status code in one table
(service/http/errors.py); `code` is the stable machine-readable name clients see in `{"error": {"code": ...}}`
and the `reason` label of `armt_failures_total`."""
from __future__ import annotations


class ArmtServiceError(Exception):
    """Base class: a failure with a message meant for the client (never a traceback)."""

    code = "internal"

    def __init__(self, message: str, **extra) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra  # extra fields for the error body, e.g. the current offset of a conflict


class InvalidRequest(ArmtServiceError):
    """The request is well-formed but its values are not acceptable (empty question, bad limits)."""

    code = "invalid_request"


class InvalidText(ArmtServiceError):
    """An append body is not valid UTF-8; `extra["position"]` is the absolute byte offset in the document."""

    code = "invalid_utf8"


class UnsupportedMediaType(ArmtServiceError):
    code = "unsupported_media_type"


class PayloadTooLarge(ArmtServiceError):
    code = "payload_too_large"


class Unauthorized(ArmtServiceError):
    code = "unauthorized"


class SessionNotFound(ArmtServiceError):
    """No such session for this tenant (another tenant's session is reported the same way)."""

    code = "not_found"


class OffsetConflict(ArmtServiceError):
    """An append named an offset other than the acknowledged one; `extra["offset"]` is the current offset."""

    code = "offset_mismatch"


class VersionConflict(OffsetConflict):
    """A store refused a write: the session changed (or was deleted) since it was read, e.g. another replica's
    append to the same session won the race. The session service answers it as a 409 with the current offset."""


class StateConflict(ArmtServiceError):
    """A session's state was written by another model than the one this server runs."""

    code = "state_model_mismatch"


class Overloaded(ArmtServiceError):
    """The engine queue is full; `retry_after` seconds is a hint for the client's backoff."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ArmtServiceError):
    """The model is still loading (or failed to load)."""

    code = "not_ready"


class QuotaExceeded(ArmtServiceError):
    """A tenant already holds as many sessions as it may (ARMT_MAX_SESSIONS_PER_TENANT): delete some first."""

    code = "session_quota"


class ShuttingDown(ArmtServiceError):
    """The server is stopping and a streamed answer did not end within its grace period (ask again elsewhere)."""

    code = "shutting_down"


class Cancelled(ArmtServiceError):
    """The client went away; the work was dropped. Never reaches a client, counted as a failure reason."""

    code = "cancelled"


class StoreError(ArmtServiceError):
    """The session store could not read or write (disk full, corrupt file)."""

    code = "store_error"
