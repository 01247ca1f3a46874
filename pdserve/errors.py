"""Typed errors shared by every pdserve part.

Each error carries a status code name (the gRPC status it maps to). Workers never raise these
across Ray: they report them as `ErrorInfo` inside msgpack events, and the router turns them
back into exceptions with `error_from_info`. One interceptor in the router maps them to gRPC
statuses. This module imports neither grpc nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StatusCode(str, Enum):
    """The subset of gRPC status codes pdserve produces, by name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class PdserveError(Exception):
    """Base of all pdserve errors; `code` says which status it maps to."""

    code: StatusCode = StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message)

    def with_message(self, message: str) -> PdserveError:
        """A copy of this error (same type, code and attributes) saying `message`; the error
        itself is left as it is (one error object may end several requests)."""
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.message = message
        copy.args = (message,)
        return copy


class InvalidArgument(PdserveError):
    """A request field is out of bounds; the message starts with the field's name."""

    code = StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ResourceExhausted(PdserveError):
    code = StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(PdserveError):
    code = StatusCode.DEADLINE_EXCEEDED


class Cancelled(PdserveError):
    code = StatusCode.CANCELLED


class Unavailable(PdserveError):
    code = StatusCode.UNAVAILABLE


class FailedPrecondition(PdserveError):
    code = StatusCode.FAILED_PRECONDITION


class NotFound(PdserveError):
    code = StatusCode.NOT_FOUND


class DataLoss(PdserveError):
    code = StatusCode.DATA_LOSS


class Unauthenticated(PdserveError):
    code = StatusCode.UNAUTHENTICATED


class Internal(PdserveError):
    code = StatusCode.INTERNAL


class ConfigError(Exception):
    """The YAML config is invalid; the message names the key and the valid choices."""


_ERROR_BY_CODE: dict[StatusCode, type[PdserveError]] = {
    cls.code: cls
    for cls in (
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unavailable,
        FailedPrecondition,
        NotFound,
        DataLoss,
        Unauthenticated,
        Internal,
    )
}


@dataclass(frozen=True)
class ErrorInfo:
    """An error as it travels inside a msgpack message."""

    code: StatusCode
    message: str


def error_from_info(info: ErrorInfo) -> PdserveError:
    """Rebuilds the typed error a worker reported."""
    if info.code is StatusCode.INVALID_ARGUMENT:
        field, _, problem = info.message.partition(": ")
        return InvalidArgument(field, problem)
    return _ERROR_BY_CODE.get(info.code, Internal)(info.message)
