"""The public `pdserve.v1.Admin` service: operator calls on the running service (`Scale`).

A thin adapter like `router.servicer`: protobuf stays here, `ScaleController` does the work,
and a `PdserveError` ends the call through `abort_with`. Served on the router's port behind the
same bearer-token interceptor as Generation (`router.auth` guards every service but health).
"""

from __future__ import annotations

import grpc

from pdserve.errors import FailedPrecondition, InvalidArgument, PdserveError
from pdserve.v1 import pdserve_pb2
from router.scaling import ScaleController
from router.status import abort_with

ADMIN_SERVICE_NAME = "pdserve.v1.Admin"
# A ScaleRequest names a few pools; anything bigger is refused before it is parsed.
MAX_SCALE_REQUEST_BYTES = 4096


class AdminServicer:
    def __init__(self, controller: ScaleController | None) -> None:
        # None: the router was started without a replica factory and cannot scale.
        self._controller = controller

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADMIN_SERVICE_NAME,
            {
                "Scale": grpc.unary_unary_rpc_method_handler(
                    self.Scale,
                    request_deserializer=_parse_scale_request,
                    response_serializer=pdserve_pb2.ScaleResponse.SerializeToString,
                ),
            },
        )

    async def Scale(  # noqa: N802 - gRPC method name
        self, request: pdserve_pb2.ScaleRequest | None, context: grpc.aio.ServicerContext
    ) -> pdserve_pb2.ScaleResponse:
        try:
            if request is None:
                raise InvalidArgument(
                    "ScaleRequest", f"larger than {MAX_SCALE_REQUEST_BYTES} bytes or malformed"
                )
            if self._controller is None:
                raise FailedPrecondition("this router cannot start or stop replicas")
            previous = self._controller.scale(dict(request.target_replicas), "Admin.Scale")
            return pdserve_pb2.ScaleResponse(
                previous_target_replicas=previous,
                target_replicas=self._controller.targets(),
            )
        except PdserveError as exc:
            await abort_with(context, exc)


def _parse_scale_request(data: bytes) -> pdserve_pb2.ScaleRequest | None:
    """The request, or None when it is too big or malformed (the handler reports it)."""
    if len(data) > MAX_SCALE_REQUEST_BYTES:
        return None
    try:
        return pdserve_pb2.ScaleRequest.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; reported as a bad request
        return None
