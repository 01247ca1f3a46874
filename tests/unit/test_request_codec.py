"""parse_generate_request never raises, names the field with bad UTF-8, and reaches the client as
INVALID_ARGUMENT through router.status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from pdserve.errors import InvalidArgument, PdserveError, StatusCode, Unavailable
from pdserve.v1 import pdserve_pb2
from router.request_codec import (
    InvalidRequestBytes,
    generate_request_deserializer,
    parse_generate_request,
)
from router.status import abort_with, grpc_status

MAX_BYTES = 1024


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def len_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field in protobuf wire format."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def valid_request() -> pdserve_pb2.GenerateRequest:
    request = pdserve_pb2.GenerateRequest(text="Hello, 世界")
    request.sampling.max_tokens = 8
    request.sampling.stop.extend(["ab", "😀"])
    request.sampling.stop_token_ids.extend([0, 7])
    request.sampling.seed = 2**64 - 1
    return request


def test_valid_bytes_parse() -> None:
    request = valid_request()
    assert parse_generate_request(request.SerializeToString(), MAX_BYTES) == request
    ids = pdserve_pb2.GenerateRequest(token_ids=pdserve_pb2.TokenIds(ids=[1, 2, 3]))
    assert parse_generate_request(ids.SerializeToString(), MAX_BYTES) == ids


def test_invalid_utf8_in_text_names_prompt_text() -> None:
    data = len_field(1, b"ok \xff\xfe") + len_field(3, b"\x08\x08")
    parsed = parse_generate_request(data, MAX_BYTES)
    assert parsed == InvalidRequestBytes("prompt.text", "not valid UTF-8")


@pytest.mark.parametrize("bad", [b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_in_second_stop_string_names_sampling_stop(bad: bytes) -> None:
    # Truncated, surrogate, overlong and beyond U+10FFFF sequences.
    sampling = b"\x08\x08" + len_field(6, b"fine") + len_field(6, b"x" + bad)
    data = len_field(1, b"Hello") + len_field(3, sampling)
    parsed = parse_generate_request(data, MAX_BYTES)
    assert isinstance(parsed, InvalidRequestBytes)
    assert parsed.field == "sampling.stop"


def test_marker_converts_to_invalid_argument() -> None:
    error = InvalidRequestBytes("prompt.text", "not valid UTF-8").to_error()
    assert isinstance(error, InvalidArgument)
    assert error.field == "prompt.text"
    assert error.message == "prompt.text: not valid UTF-8"


def test_oversize_is_rejected_before_parsing() -> None:
    data = pdserve_pb2.GenerateRequest(text="x" * MAX_BYTES).SerializeToString()
    parsed = parse_generate_request(data, MAX_BYTES)
    assert isinstance(parsed, InvalidRequestBytes)
    assert parsed.field == "request"
    assert str(len(data)) in parsed.problem and str(MAX_BYTES) in parsed.problem


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff",  # a tag varint that never ends
        len_field(1, b"Hello")[:-2],  # length runs past the end
        b"\x0c",  # an end-group tag without a start
        b"\x0e",  # wire type 6 does not exist
        len_field(3, b"\x32\x05ab"),  # sampling.stop truncated inside the sub-message
    ],
)
def test_garbage_bytes_are_rejected(data: bytes) -> None:
    parsed = parse_generate_request(data, MAX_BYTES)
    assert parsed == InvalidRequestBytes("request", "not a valid GenerateRequest message")


def test_bad_utf8_after_unknown_fields_and_groups_is_still_found() -> None:
    unknown = b"\x78\x05" + b"\x7b" + len_field(2, b"x") + b"\x7c" + b"\x7d\x00\x00\x00\x00"
    parsed = parse_generate_request(unknown + len_field(1, b"\xe2\x82"), MAX_BYTES)
    assert parsed == InvalidRequestBytes("prompt.text", "not valid UTF-8")


def test_unknown_fields_are_ignored_like_protobuf_does() -> None:
    data = len_field(15, b"\xff\xfe") + len_field(1, b"Hello")
    parsed = parse_generate_request(data, MAX_BYTES)
    assert isinstance(parsed, pdserve_pb2.GenerateRequest)
    assert parsed.text == "Hello"


def test_deserializer_binds_the_limit() -> None:
    deserialize = generate_request_deserializer(16)
    assert isinstance(deserialize(len_field(1, b"short")), pdserve_pb2.GenerateRequest)
    assert isinstance(deserialize(len_field(1, b"x" * 20)), InvalidRequestBytes)


def test_every_status_code_maps_to_the_same_named_grpc_code() -> None:
    for code in StatusCode:
        assert grpc_status(code) is grpc.StatusCode[code.value]


class _Aborted(Exception):
    pass


class _RecordingContext:
    def __init__(self) -> None:
        self.calls: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.calls.append((code, details))
        raise _Aborted


async def test_abort_with_passes_status_and_message() -> None:
    context = _RecordingContext()
    with pytest.raises(_Aborted):
        await abort_with(context, Unavailable("no live decode replica"))  # type: ignore[arg-type]
    assert context.calls == [(grpc.StatusCode.UNAVAILABLE, "no live decode replica")]


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    """A loopback aio server whose Generate uses the codec and aborts on a marker."""

    async def generate(request, context):  # noqa: ANN001, ANN202 - grpc handler signature
        if isinstance(request, InvalidRequestBytes):
            await abort_with(context, request.to_error())
        yield pdserve_pb2.GenerateResponse(text=request.text)

    handler = grpc.method_handlers_generic_handler(
        "pdserve.v1.Generation",
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                generate,
                request_deserializer=generate_request_deserializer(MAX_BYTES),
                response_serializer=pdserve_pb2.GenerateResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def call_raw(address: str, data: bytes) -> list[pdserve_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        generate = channel.unary_stream(
            "/pdserve.v1.Generation/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pdserve_pb2.GenerateResponse.FromString,
        )
        return [response async for response in generate(data, timeout=10)]


async def test_bad_utf8_reaches_the_client_as_invalid_argument(echo_server: str) -> None:
    assert [r.text for r in await call_raw(echo_server, len_field(1, b"hi"))] == ["hi"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(echo_server, len_field(1, b"bad \xff"))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "prompt.text: not valid UTF-8"


def test_pdserve_errors_carry_codes_that_map() -> None:
    assert grpc_status(PdserveError("x").code) is grpc.StatusCode.INTERNAL
    assert grpc_status(InvalidArgument("f", "p").code) is grpc.StatusCode.INVALID_ARGUMENT
