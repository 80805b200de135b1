"""Errors that travel over the wire, each with its pinned code (protocol.md, "Error codes").

    ChatdError                    any failure a client may see
    ├── BadRequest        (1)     malformed body, unknown op, bad parameter
    ├── NotAuthenticated  (2)     no, invalid, expired or revoked token
    ├── BadCredentials    (3)     wrong name or password (one message for both)
    ├── NameTaken         (4)     /register with a name already in use
    ├── NotFound          (5)     no such user or channel
    ├── Forbidden         (6)     authenticated, but not allowed
    ├── TooLarge          (7)     frame or field over its limit
    │   └── FrameTooLarge         length header over the limit: the stream is dropped
    ├── RateLimited       (8)     slow down
    └── ServerError       (9)     our fault; details go to the log, never the wire
        └── OutOfDisk             a write failed because the database's disk is full

The server turns any other exception into ServerError in one place
(``connection.py``), so no traceback text ever reaches a client.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ErrorCode(IntEnum):
    OK = 0
    BAD_REQUEST = 1
    NOT_AUTHENTICATED = 2
    BAD_CREDENTIALS = 3
    NAME_TAKEN = 4
    NOT_FOUND = 5
    FORBIDDEN = 6
    TOO_LARGE = 7
    RATE_LIMITED = 8
    SERVER_ERROR = 9


class ChatdError(Exception):
    """A failure with a wire code and a message safe to show the client."""

    code: ClassVar[ErrorCode] = ErrorCode.SERVER_ERROR
    default_message: ClassVar[str] = "server error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class BadRequest(ChatdError):
    code = ErrorCode.BAD_REQUEST
    default_message = "bad request"


class NotAuthenticated(ChatdError):
    code = ErrorCode.NOT_AUTHENTICATED
    default_message = "not authenticated"


class BadCredentials(ChatdError):
    code = ErrorCode.BAD_CREDENTIALS
    default_message = "wrong name or password"


class NameTaken(ChatdError):
    code = ErrorCode.NAME_TAKEN
    default_message = "name already taken"


class NotFound(ChatdError):
    code = ErrorCode.NOT_FOUND
    default_message = "not found"


class Forbidden(ChatdError):
    code = ErrorCode.FORBIDDEN
    default_message = "forbidden"


class TooLarge(ChatdError):
    code = ErrorCode.TOO_LARGE
    default_message = "too large"


class FrameTooLarge(TooLarge):
    """The length header announces more than ``max_frame_size``; the connection is closed."""


class RateLimited(ChatdError):
    code = ErrorCode.RATE_LIMITED
    default_message = "rate limited"

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(ChatdError):
    code = ErrorCode.SERVER_ERROR
    default_message = "server error"


class OutOfDisk(ServerError):
    """A write found no disk space; nothing of it was stored, and reads go on working."""

    default_message = "server is out of disk space"


def error_for(code: int, message: str) -> ChatdError:
    """The exception a client raises for a failed reply (unknown codes become ChatdError)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:  # a code newer than this library
        return ChatdError(f"{message} (code {code})")
    return cls(message)


ERRORS_BY_CODE: dict[int, type[ChatdError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotAuthenticated,
        BadCredentials,
        NameTaken,
        NotFound,
        Forbidden,
        TooLarge,
        RateLimited,
        ServerError,
    )
}
