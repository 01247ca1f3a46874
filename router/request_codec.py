"""Request deserializers for the aio server that never raise, for every public RPC.

gRPC answers a deserializer exception with INTERNAL or UNKNOWN and the Python exception text,
but the cause is the client's: bytes that are not the message, or invalid UTF-8 in `string`
fields. So a servicer gets either a parsed request or an `InvalidRequestBytes` marker naming
the field, and answers INVALID_ARGUMENT.

Sizes: our own limit (`limits.max_request_bytes`) is checked first, before any parsing. gRPC's
receive limit is set well above it (`grpc_receive_limit`), so an oversized request up to that
gets our INVALID_ARGUMENT naming both sizes; only beyond it does gRPC itself refuse the message
(RESOURCE_EXHAUSTED) without reading it.

The field with bad UTF-8 is found by walking the wire format with the message descriptors
(string fields checked as bytes), so new string fields are covered without edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from pdserve.errors import InvalidArgument
from pdserve.v1 import pdserve_pb2

# The request messages nest two levels deep; the cap only guards against a malicious wire.
_MAX_DEPTH = 16
_VARINT, _I64, _LEN, _START_GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5
# gRPC's own receive limit is this many times ours (at least _MIN_GRPC_RECEIVE_BYTES).
_GRPC_RECEIVE_FACTOR = 16
_MIN_GRPC_RECEIVE_BYTES = 16 * 1024 * 1024

M = TypeVar("M")


@dataclass(frozen=True)
class InvalidRequestBytes:
    """Marker for request bytes that cannot become a `GenerateRequest`."""

    # Proto field path such as `prompt.text`, or `request` when no field is to blame.
    field: str
    problem: str

    def to_error(self) -> InvalidArgument:
        return InvalidArgument(self.field, self.problem)


def grpc_receive_limit(max_request_bytes: int) -> int:
    """The `grpc.max_receive_message_length` for a server whose own limit is
    `max_request_bytes`: far enough above it that our size check, not gRPC's, answers."""
    return max(_GRPC_RECEIVE_FACTOR * max_request_bytes, _MIN_GRPC_RECEIVE_BYTES)


def parse_request(message_type: type[M], data: bytes, max_bytes: int) -> M | InvalidRequestBytes:
    """Parses request bytes into `message_type`; returns a marker instead of raising.

    Called by gRPC on the event loop for every call; the size is checked before any parsing,
    so the work is bounded by `max_bytes`.
    """
    if len(data) > max_bytes:
        return InvalidRequestBytes(
            "request", f"{len(data)} bytes exceeds the {max_bytes}-byte limit"
        )
    proto: Any = message_type
    try:
        return proto.FromString(data)  # type: ignore[no-any-return]
    except DecodeError:
        field = _find_invalid_utf8(proto.DESCRIPTOR, data)
    if field is None:
        return InvalidRequestBytes("request", f"not a valid {proto.DESCRIPTOR.name} message")
    return InvalidRequestBytes(field, "not valid UTF-8")


def parse_generate_request(
    data: bytes, max_bytes: int
) -> pdserve_pb2.GenerateRequest | InvalidRequestBytes:
    """`parse_request` for `GenerateRequest`."""
    return parse_request(pdserve_pb2.GenerateRequest, data, max_bytes)


def request_deserializer(
    message_type: type[M], max_bytes: int
) -> Callable[[bytes], M | InvalidRequestBytes]:
    """`parse_request` bound to a message type and a size limit, for `request_deserializer=`."""

    def deserialize(data: bytes) -> M | InvalidRequestBytes:
        return parse_request(message_type, data, max_bytes)

    return deserialize


def generate_request_deserializer(
    max_bytes: int,
) -> Callable[[bytes], pdserve_pb2.GenerateRequest | InvalidRequestBytes]:
    """`request_deserializer` for `GenerateRequest`."""
    return request_deserializer(pdserve_pb2.GenerateRequest, max_bytes)


class _WireError(Exception):
    """The bytes are not protobuf wire format."""


def _find_invalid_utf8(descriptor: Descriptor, data: bytes) -> str | None:
    try:
        return _walk(descriptor, memoryview(data), "", 0)
    except _WireError:
        return None


def _walk(descriptor: Descriptor, data: memoryview, path: str, depth: int) -> str | None:
    """Path of the first string field (at any depth) whose bytes are not valid UTF-8."""
    pos = 0
    while pos < len(data):
        number, wire_type, pos = _read_tag(data, pos)
        if wire_type == _LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise _WireError
            payload = data[pos : pos + length]
            pos += length
            found = _check_field(descriptor.fields_by_number.get(number), payload, path, depth)
            if found is not None:
                return found
        else:
            pos = _skip(data, pos, number, wire_type, depth)
    return None


def _skip(data: memoryview, pos: int, number: int, wire_type: int, depth: int) -> int:
    """Position after a non-length-delimited field (protobuf keeps unknown groups too)."""
    if wire_type == _VARINT:
        return _read_varint(data, pos)[1]
    if wire_type in (_I64, _I32):
        pos += 8 if wire_type == _I64 else 4
        if pos > len(data):
            raise _WireError
        return pos
    if wire_type != _START_GROUP or depth >= _MAX_DEPTH:
        raise _WireError
    while True:
        inner_number, inner_type, pos = _read_tag(data, pos)
        if inner_type == _END_GROUP:
            if inner_number != number:
                raise _WireError
            return pos
        if inner_type == _LEN:
            length, pos = _read_varint(data, pos)
            pos += length
            if pos > len(data):
                raise _WireError
        else:
            pos = _skip(data, pos, inner_number, inner_type, depth + 1)


def _check_field(
    field: FieldDescriptor | None, payload: memoryview, path: str, depth: int
) -> str | None:
    if field is None:
        return None
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            str(payload, "utf-8")
        except UnicodeDecodeError:
            return _field_path(path, field)
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE and depth < _MAX_DEPTH:
        return _walk(field.message_type, payload, _field_path(path, field), depth + 1)
    return None


def _field_path(path: str, field: FieldDescriptor) -> str:
    name = field.name
    oneof = field.containing_oneof
    # proto3 `optional` fields sit in a synthetic one-member oneof named `_<field>`.
    if oneof is not None and not (len(oneof.fields) == 1 and oneof.name.startswith("_")):
        name = f"{oneof.name}.{name}"
    return f"{path}.{name}" if path else name


def _read_tag(data: memoryview, pos: int) -> tuple[int, int, int]:
    tag, pos = _read_varint(data, pos)
    return tag >> 3, tag & 7, pos


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise _WireError
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _WireError
