"""Errors of Tether, one tree, each carrying a wire code.

::

    TetherError                     code, retryable, message
    ├── ProtocolError               the peer broke the protocol
    │   ├── BadMessage              4400 / HTTP 400: undecodable or invalid message
    │   ├── MessageTooLarge         4413 / HTTP 413: frame, batch or payload over a limit
    │   └── ProtocolVersionError    4409 / HTTP 400: unsupported protocol_version
    ├── Unauthorized                4401 / HTTP 401: missing, bad or expired token
    ├── Forbidden                   4403 / HTTP 403: wrong role or another tenant's data
    ├── NotFound                    4404 / HTTP 404: no such workflow or entry (for this tenant)
    ├── ValidationError             4422 / HTTP 422: well-formed but unacceptable arguments
    ├── Conflict                    4409 / HTTP 409: e.g. a mutation id that skips ahead
    ├── RateLimited                 4429 / HTTP 429: slow down (``retry_after`` seconds)
    ├── Unavailable                 1013 / HTTP 503: try again later (draining, full, storage down)
    ├── StorageError                1011 / HTTP 500: the database failed (converted at the call)
    ├── InvalidTransition           1011 / HTTP 500: a status change the transition table forbids
    └── UsageError                  local only: the API was called wrongly (not a peer's fault)

"The peer broke the protocol" (``ProtocolError``) is kept apart from "we were called
wrongly" (``UsageError``), as h11 does. ``ERROR_TABLE`` is the one place mapping a code
to its WebSocket close code, HTTP status and retryability.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, NamedTuple

__all__ = [
    "ERROR_TABLE",
    "BadMessage",
    "Conflict",
    "ErrorCode",
    "ErrorInfo",
    "Forbidden",
    "InvalidTransition",
    "MessageTooLarge",
    "NotFound",
    "ProtocolError",
    "ProtocolVersionError",
    "RateLimited",
    "StorageError",
    "TetherError",
    "Unauthorized",
    "Unavailable",
    "UsageError",
    "ValidationError",
    "error_from_code",
]


class ErrorCode(StrEnum):
    """Machine-readable error codes carried by ``Error`` messages and HTTP bodies."""

    BAD_MESSAGE = "bad_message"
    TOO_LARGE = "too_large"
    PROTOCOL_VERSION = "protocol_version"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    STORAGE = "storage"
    INTERNAL = "internal"
    USAGE = "usage"


class ErrorInfo(NamedTuple):
    """How one error code shows on each transport."""

    close_code: int
    http_status: int
    retryable: bool


ERROR_TABLE: dict[ErrorCode, ErrorInfo] = {
    ErrorCode.BAD_MESSAGE: ErrorInfo(4400, 400, False),
    ErrorCode.TOO_LARGE: ErrorInfo(4413, 413, False),
    ErrorCode.PROTOCOL_VERSION: ErrorInfo(4409, 400, False),
    ErrorCode.UNAUTHORIZED: ErrorInfo(4401, 401, False),
    ErrorCode.FORBIDDEN: ErrorInfo(4403, 403, False),
    ErrorCode.NOT_FOUND: ErrorInfo(4404, 404, False),
    ErrorCode.INVALID: ErrorInfo(4422, 422, False),
    ErrorCode.CONFLICT: ErrorInfo(4409, 409, False),
    ErrorCode.RATE_LIMITED: ErrorInfo(4429, 429, True),
    ErrorCode.UNAVAILABLE: ErrorInfo(1013, 503, True),
    ErrorCode.STORAGE: ErrorInfo(1011, 500, True),
    ErrorCode.INTERNAL: ErrorInfo(1011, 500, True),
    ErrorCode.USAGE: ErrorInfo(1011, 500, False),
}


class TetherError(Exception):
    """Root of every Tether error.

    Args:
        message: a sentence for humans; defaults to the class's summary.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip().splitlines()[0]
        super().__init__(self.message)

    @property
    def info(self) -> ErrorInfo:
        """Close code, HTTP status and retryability of this error."""
        return ERROR_TABLE[self.code]

    @property
    def retryable(self) -> bool:
        """Whether trying the same thing later may succeed."""
        return self.info.retryable

    @property
    def close_code(self) -> int:
        """The WebSocket close code for this error."""
        return self.info.close_code

    @property
    def http_status(self) -> int:
        """The HTTP status for this error."""
        return self.info.http_status


class ProtocolError(TetherError):
    """The peer broke the protocol."""

    code = ErrorCode.BAD_MESSAGE


class BadMessage(ProtocolError):
    """Malformed or invalid message."""

    code = ErrorCode.BAD_MESSAGE


class MessageTooLarge(ProtocolError):
    """Message over the size limit."""

    code = ErrorCode.TOO_LARGE


class ProtocolVersionError(ProtocolError):
    """Unsupported protocol version."""

    code = ErrorCode.PROTOCOL_VERSION


class Unauthorized(TetherError):
    """Missing, malformed or expired credentials."""

    code = ErrorCode.UNAUTHORIZED


class Forbidden(TetherError):
    """Not allowed for this token."""

    code = ErrorCode.FORBIDDEN


class NotFound(TetherError):
    """No such object."""

    code = ErrorCode.NOT_FOUND


class ValidationError(TetherError):
    """Arguments were well-formed but not acceptable."""

    code = ErrorCode.INVALID


class Conflict(TetherError):
    """The request conflicts with the server's state."""

    code = ErrorCode.CONFLICT


class RateLimited(TetherError):
    """Too many requests; retry later.

    Args:
        message: human text.
        retry_after: seconds until a retry may succeed.
    """

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TetherError):
    """Try again later."""

    code = ErrorCode.UNAVAILABLE


class StorageError(TetherError):
    """The database failed."""

    code = ErrorCode.STORAGE


class InvalidTransition(TetherError):
    """A status change that the transition table does not allow."""

    code = ErrorCode.INTERNAL


class UsageError(TetherError):
    """The API was called wrongly."""

    code = ErrorCode.USAGE


_BY_CODE: dict[ErrorCode, type[TetherError]] = {
    ErrorCode.BAD_MESSAGE: BadMessage,
    ErrorCode.TOO_LARGE: MessageTooLarge,
    ErrorCode.PROTOCOL_VERSION: ProtocolVersionError,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.INVALID: ValidationError,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.STORAGE: StorageError,
    ErrorCode.INTERNAL: TetherError,
    ErrorCode.USAGE: UsageError,
}


def error_from_code(code: ErrorCode | str, message: str) -> TetherError:
    """Rebuild the local exception for an error code received from the peer.

    Args:
        code: the wire code; an unknown one maps to ``TetherError``.
        message: the peer's message.

    Returns:
        An instance of the matching ``TetherError`` subclass.
    """
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        cls = TetherError
    return cls(message)
