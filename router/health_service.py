"""The standard `grpc.health.v1.Health` service, served with a request parser that never raises.

grpc's own health servicer keeps the status table (`router.server` sets it); only its method
table is ours, so that bytes that are not a `HealthCheckRequest` get INVALID_ARGUMENT like
every other public RPC (`router.request_codec`) instead of an error carrying Python internals.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from router.request_codec import InvalidRequestBytes, request_deserializer
from router.status import abort_with

HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
# A HealthCheckRequest names one service; anything bigger is refused before it is parsed.
MAX_HEALTH_REQUEST_BYTES = 4096


def health_handler(servicer: health.aio.HealthServicer) -> grpc.GenericRpcHandler:
    """`Check` and `Watch` of `servicer`, behind the never-raising parser."""

    async def check(
        request: health_pb2.HealthCheckRequest | InvalidRequestBytes,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        if isinstance(request, InvalidRequestBytes):
            await abort_with(context, request.to_error())
        return await servicer.Check(request, context)

    async def watch(
        request: health_pb2.HealthCheckRequest | InvalidRequestBytes,
        context: grpc.aio.ServicerContext,
    ) -> None:
        if isinstance(request, InvalidRequestBytes):
            await abort_with(context, request.to_error())
        await servicer.Watch(request, context)  # it writes its answers itself

    deserialize = request_deserializer(health_pb2.HealthCheckRequest, MAX_HEALTH_REQUEST_BYTES)
    serialize = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        HEALTH_SERVICE_NAME,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check, request_deserializer=deserialize, response_serializer=serialize
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=deserialize, response_serializer=serialize
            ),
        },
    )
