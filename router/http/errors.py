"""The one mapping from pdserve's typed errors to HTTP statuses and OpenAI's error object.

Validation names fields by their gRPC paths (`sampling.max_tokens`); each endpoint gives a
table that renames them to its own parameters (`max_tokens`), so `param` in the error object is
what the client sent. Statuses follow Google's gRPC-to-HTTP mapping, which is what OpenAI's
clients turn into their own exception classes (400 BadRequestError, 401, 404, 429, 5xx).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.errors import InvalidArgument, PdserveError, StatusCode

_HTTP_STATUS: dict[StatusCode, tuple[int, str]] = {
    StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    StatusCode.NOT_FOUND: (404, "not_found_error"),
    StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    # The server cancelled it (e.g. while shutting down); a client that left gets nothing.
    StatusCode.CANCELLED: (503, "service_unavailable_error"),
    StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    StatusCode.DATA_LOSS: (500, "server_error"),
    StatusCode.INTERNAL: (500, "server_error"),
}

_CODE_NAMES = {
    400: StatusCode.INVALID_ARGUMENT.value,
    401: StatusCode.UNAUTHENTICATED.value,
    404: StatusCode.NOT_FOUND.value,
    413: StatusCode.INVALID_ARGUMENT.value,
    429: StatusCode.RESOURCE_EXHAUSTED.value,
    503: StatusCode.UNAVAILABLE.value,
    504: StatusCode.DEADLINE_EXCEEDED.value,
}

# Field paths validation uses that mean the same parameter on every endpoint.
COMMON_PARAMS: dict[str, str] = {
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.min_tokens": "min_tokens",
    "sampling.stop": "stop",
    "sampling.stop_token_ids": "stop_token_ids",
    "sampling.seed": "seed",
    "n": "n",
    "priority": "priority",
}


@dataclass(frozen=True)
class HttpError:
    """An error as the HTTP API answers it."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None

    @property
    def code_name(self) -> str:
        """The status code name pdserve's metrics count it under (gRPC names, as for gRPC)."""
        return _CODE_NAMES.get(self.status, StatusCode.INTERNAL.value)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code if self.code is not None else str(self.status),
            }
        }


def http_error(error: PdserveError, params: Mapping[str, str] | None = None) -> HttpError:
    """The HTTP form of `error`; `params` renames validation's field paths to parameters."""
    status, error_type = _HTTP_STATUS.get(error.code, (500, "server_error"))
    code = error.code.value.lower()
    if not isinstance(error, InvalidArgument):
        return HttpError(status, error.message, error_type, None, code)
    param = (params or {}).get(error.field, error.field)
    problem = error.message.partition(": ")[2]
    return HttpError(status, f"{param}: {problem}", error_type, param, code)


def invalid_param(param: str | None, problem: str) -> HttpError:
    """A 400 about one parameter (or the whole body when `param` is None)."""
    message = f"{param}: {problem}" if param else problem
    return HttpError(400, message, "invalid_request_error", param, "invalid_argument")


class HttpErrorResponse(Exception):
    """Raised by handlers and parsers to answer with `error` (before any byte was sent)."""

    def __init__(self, error: HttpError) -> None:
        super().__init__(error.message)
        self.error = error
