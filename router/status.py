"""The one mapping from pdserve's typed errors to gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from pdserve.errors import PdserveError, StatusCode

_GRPC_STATUS: dict[StatusCode, grpc.StatusCode] = {
    StatusCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    StatusCode.CANCELLED: grpc.StatusCode.CANCELLED,
    StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    StatusCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    StatusCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    StatusCode.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    StatusCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    StatusCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_status(code: StatusCode) -> grpc.StatusCode:
    """The gRPC status for a pdserve status code (INTERNAL for anything unmapped)."""
    return _GRPC_STATUS.get(code, grpc.StatusCode.INTERNAL)


async def abort_with(context: grpc.aio.ServicerContext, error: PdserveError) -> NoReturn:
    """Ends the RPC with `error`'s status and message.

    Called by servicers; raises the exception grpc.aio uses to end the call (servicers let it
    propagate), so it never returns.
    """
    await context.abort(grpc_status(error.code), error.message)
    raise AssertionError("grpc.aio ServicerContext.abort returned")
