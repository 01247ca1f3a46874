"""Conversion between stream messages and their protobuf form, and between TransferErrors and
gRPC statuses. The only place besides the two gRPC classes that knows about protobuf messages.
"""

from __future__ import annotations

import grpc

from kvtransfer.errors import TransferError, TransferFailedPrecondition, transfer_error
from kvtransfer.layout import ChunkSpec, KVLayout
from kvtransfer.shm_segment import ShmRef
from kvtransfer.stream import Chunk, Commit, Header, Message
from kvtransfer.wire_dtype import CACHE
from pdserve.errors import StatusCode
from pdserve.internal.v1 import kv_transfer_pb2


def message_to_proto(message: Message) -> kv_transfer_pb2.KVMessage:
    if isinstance(message, Header):
        return kv_transfer_pb2.KVMessage(header=kv_transfer_pb2.KVHeader(
            transfer_id=message.transfer_id,
            layout=message.layout.to_proto(),
            num_tokens=message.num_tokens,
            num_chunks=message.num_chunks,
            group_id=message.group_id,
            # Empty for "cache": such a header is byte-identical to one from before the field.
            wire_dtype="" if message.wire_dtype == CACHE else message.wire_dtype,
        ))
    if isinstance(message, Chunk):
        spec = message.spec
        data = message.data if isinstance(message.data, bytes) else bytes(message.data)
        chunk = kv_transfer_pb2.KVChunk(
            seq=spec.seq,
            layer_start=spec.layer_start,
            layer_end=spec.layer_end,
            token_start=spec.token_start,
            token_end=spec.token_end,
            crc32c=message.crc32c,
            data=data,
            via_group=message.via_group,
        )
        if message.shm is not None:
            ref = message.shm
            chunk.shm.CopyFrom(
                kv_transfer_pb2.ShmRef(segment=ref.segment, offset=ref.offset, length=ref.length)
            )
        return kv_transfer_pb2.KVMessage(chunk=chunk)
    return kv_transfer_pb2.KVMessage(commit=kv_transfer_pb2.KVCommit(
        num_chunks=message.num_chunks, first_token_id=message.first_token_id
    ))


# Protobuf tags (field number << 3 | wire type 2 = length-delimited) of KVMessage.chunk and
# KVChunk.data, for writing a chunk without protobuf copying its payload.
_CHUNK_TAG = b"\x12"
_DATA_TAG = b"\x3a"


def encode_message(message: Message) -> bytes:
    """A KVMessage's wire bytes. An inline chunk's payload is copied once (into the result):
    protobuf fields may come in any order, so the small fields are serialized by protobuf and
    the data field is appended by hand. Byte-for-byte a valid KVMessage."""
    if not isinstance(message, Chunk) or message.shm is not None or not message.data:
        return message_to_proto(message).SerializeToString()
    data = memoryview(message.data).cast("B")
    without_data = Chunk(message.spec, message.crc32c, b"", None, message.via_group)
    head = message_to_proto(without_data).chunk.SerializeToString()
    data_length = _varint(data.nbytes)
    chunk_length = len(head) + len(_DATA_TAG) + len(data_length) + data.nbytes
    return b"".join((_CHUNK_TAG, _varint(chunk_length), head, _DATA_TAG, data_length, data))


def encode_side_channel_header(header: Header) -> bytes:
    """A header announcing that the chunks travel on the TCP side channel, as KVMessage bytes."""
    proto = message_to_proto(header)
    proto.header.side_channel = True
    return proto.SerializeToString()


def encode_side_channel_commit(commit: Commit, chunk_crc32cs: list[int]) -> bytes:
    """The commit of a side channel push, listing every chunk's CRC32C, as KVMessage bytes."""
    proto = message_to_proto(commit)
    proto.commit.chunk_crc32c.extend(chunk_crc32cs)
    return proto.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def message_from_proto(proto: kv_transfer_pb2.KVMessage) -> Message:
    """Raises TransferError: FAILED_PRECONDITION for an invalid layout, DATA_LOSS for a
    message with no kind set."""
    kind = proto.WhichOneof("kind")
    if kind == "header":
        header = proto.header
        return Header(
            transfer_id=header.transfer_id,
            layout=layout_from_proto(header.layout),
            num_tokens=header.num_tokens,
            num_chunks=header.num_chunks,
            group_id=header.group_id,
            wire_dtype=header.wire_dtype or CACHE,
        )
    if kind == "chunk":
        chunk = proto.chunk
        spec = ChunkSpec(
            chunk.seq, chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end
        )
        shm = None
        if chunk.HasField("shm"):
            shm = ShmRef(chunk.shm.segment, chunk.shm.offset, chunk.shm.length)
        return Chunk(spec=spec, crc32c=chunk.crc32c, data=chunk.data, shm=shm,
                     via_group=chunk.via_group)
    if kind == "commit":
        return Commit(num_chunks=proto.commit.num_chunks,
                      first_token_id=proto.commit.first_token_id)
    raise transfer_error(StatusCode.DATA_LOSS, "a KVMessage with no kind set")


def layout_from_proto(proto: kv_transfer_pb2.KVLayoutProto) -> KVLayout:
    """Raises FAILED_PRECONDITION naming the field when the peer's layout is invalid here."""
    try:
        return KVLayout.from_proto(proto)
    except ValueError as exc:
        raise TransferFailedPrecondition(f"layout mismatch: {exc}") from exc


def grpc_status(code: StatusCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.value]


def error_from_rpc(err: grpc.RpcError, doing: str) -> TransferError:
    """The TransferError for a failed call; `doing` says what the sender was doing."""
    status: grpc.StatusCode | None = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    name = status.name if status is not None else StatusCode.INTERNAL.value
    code = StatusCode(name) if name in StatusCode.__members__ else StatusCode.INTERNAL
    return transfer_error(code, f"{doing}: {details}")
