"""Client garbage on every public RPC of the real router ends in INVALID_ARGUMENT naming what
is wrong, never UNKNOWN/INTERNAL or Python internals: bytes that are no message for Info,
Health Check/Watch, Admin Scale and Generate, and a Generate far over the size limit (gRPC's own
receive cap sits well above ours, so our check answers)."""

from __future__ import annotations

import grpc
import pytest

from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2

# A length-delimited field 1 whose length runs past the end: no protobuf parser accepts it.
NOT_A_MESSAGE = b"\x0a\xff\xff\x03garbage"
UNARY = [
    "/pdserve.v1.Generation/Info",
    "/grpc.health.v1.Health/Check",
    "/pdserve.v1.Admin/Scale",
]
STREAMING = ["/pdserve.v1.Generation/Generate", "/grpc.health.v1.Health/Watch"]


def _call(address: str, method: str, payload: bytes, streaming: bool) -> grpc.RpcError:
    """Sends raw bytes to `method`; returns the error the call ended with."""
    with grpc.insecure_channel(address) as channel:
        identity = {"request_serializer": None, "response_deserializer": None}
        if streaming:
            call = channel.unary_stream(method, **identity)
            with pytest.raises(grpc.RpcError) as caught:
                for _ in call(payload, timeout=30):
                    pass
        else:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(method, **identity)(payload, timeout=30)
    return caught.value


def _assert_clean_invalid_argument(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for internal in ("Traceback", "Error(", "Exception", "deserializ", ".py"):
        assert internal not in error.details()


@pytest.mark.parametrize("method", UNARY + STREAMING)
def test_bytes_that_are_no_message_get_invalid_argument(tiny_service: Service, method: str):
    error = _call(tiny_service.address, method, NOT_A_MESSAGE, method in STREAMING)
    _assert_clean_invalid_argument(error)


def test_a_10_mb_generate_gets_invalid_argument_naming_the_sizes(tiny_service: Service):
    limit = tiny_service.config.limits.max_request_bytes
    request = pdserve_pb2.GenerateRequest(text="x" * (10 * 1024 * 1024))
    error = _call(
        tiny_service.address, STREAMING[0], request.SerializeToString(), streaming=True
    )
    _assert_clean_invalid_argument(error)
    assert f"exceeds the {limit}-byte limit" in error.details()
