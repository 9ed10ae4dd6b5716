"""The contract's error codes (docs/contract.md section 4), shared by server and client.

Each `error_code` has one exception class. The server raises them while handling a
request and turns them into an error response; the client raises the same classes when
a response carries that code, so `except vasipc.FrameNotFound` reads the same on both
sides.
"""

from __future__ import annotations

from typing import ClassVar

# Precedence when several codes apply: the first in this order wins (docs/contract.md 4).
PRECEDENCE: tuple[str, ...] = (
    "invalid_message",
    "message_too_large",
    "invalid_request",
    "model_mismatch",
    "shutting_down",
    "overloaded",
    "deadline_exceeded",
    "frame_forbidden",
    "frame_not_found",
    "unsupported_format",
    "frame_invalid",
    "frame_changed",
    "internal",
)


class ModelError(ValueError):
    """The model cannot be served: missing, unreadable, or not a family this server
    understands (one line, exit code 2; never a wire error)."""


class VasipcError(Exception):
    """Base of every error carrying a contract `error_code`."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, frame_id: int | None = None,
                 response: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.frame_id = frame_id
        self.response = response  # the full response, when raised by the client

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidMessage(VasipcError):
    code = "invalid_message"


class MessageTooLarge(VasipcError):
    code = "message_too_large"


class InvalidRequest(VasipcError):
    code = "invalid_request"


class ModelMismatch(VasipcError):
    code = "model_mismatch"


class ShuttingDown(VasipcError):
    code = "shutting_down"


class Overloaded(VasipcError):
    code = "overloaded"


class DeadlineExceeded(VasipcError):
    code = "deadline_exceeded"


class FrameForbidden(VasipcError):
    code = "frame_forbidden"


class FrameNotFound(VasipcError):
    code = "frame_not_found"


class UnsupportedFormat(VasipcError):
    code = "unsupported_format"


class FrameInvalid(VasipcError):
    code = "frame_invalid"


class FrameChanged(VasipcError):
    code = "frame_changed"


class InternalError(VasipcError):
    code = "internal"


ERROR_CLASSES: dict[str, type[VasipcError]] = {
    cls.code: cls
    for cls in (InvalidMessage, MessageTooLarge, InvalidRequest, ModelMismatch, ShuttingDown,
                Overloaded, DeadlineExceeded, FrameForbidden, FrameNotFound,
                UnsupportedFormat, FrameInvalid, FrameChanged, InternalError)
}
assert tuple(sorted(ERROR_CLASSES)) == tuple(sorted(PRECEDENCE))


def error_for(code: str, message: str, **kw) -> VasipcError:
    """The exception for a response's `error_code` (unknown codes map to InternalError)."""
    return ERROR_CLASSES.get(code, InternalError)(message, **kw)


def first_line(exc: BaseException) -> str:
    """An exception's message as one log or error line: its first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
