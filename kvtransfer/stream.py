"""The messages of one push stream (header, chunks, commit) as plain objects, and the
sender-side generator that produces them lazily from a KVSource.

Transports convert these to their own wire form at the boundary (grpc_codec.py for gRPC);
inproc passes them as they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvtransfer.base import FirstToken, KVSource
from kvtransfer.checksum import checksum
from kvtransfer.errors import (
    TransferCancelled,
    TransferDataLoss,
    TransferFailedPrecondition,
    TransferInternal,
    as_transfer_error,
)
from kvtransfer.layout import ChunkSpec, KVLayout, plan_chunks
from kvtransfer.shm_segment import ShmChunkWriter, ShmRef
from kvtransfer.wire_dtype import CACHE, check_wire_dtype, encode_chunk, wire_bytes
from pdserve.config import KVTransferConfig

if TYPE_CHECKING:
    from kvtransfer.faults import ChunkFault

# Room for the protobuf framing of a chunk message around its data.
MESSAGE_OVERHEAD_BYTES = 1024


@dataclass(frozen=True)
class Header:
    transfer_id: str
    layout: KVLayout
    num_tokens: int
    num_chunks: int
    # The pair group (transport "nccl") that carries the chunks marked `via_group`; "" if none.
    group_id: str = ""
    # The dtype the chunks' KV travels in (kvtransfer/wire_dtype.py); "cache" = no conversion.
    wire_dtype: str = CACHE


@dataclass(frozen=True)
class Chunk:
    spec: ChunkSpec
    crc32c: int
    # 1-D unsigned-byte view (or bytes) of exactly wire_chunk_bytes(layout, header's
    # wire_dtype, spec) bytes (spec.num_bytes(layout) for "cache"); empty when
    # the bytes travel in a shared-memory segment (`shm`) or over the header's pair group
    # (`via_group`, sent right after this message).
    data: bytes | memoryview
    shm: ShmRef | None = None
    via_group: bool = False


@dataclass(frozen=True)
class Commit:
    num_chunks: int
    first_token_id: int


Message = Header | Chunk | Commit


class ChunkPlan(list[ChunkSpec]):
    """The chunks of one send (a list, in stream order) and the wire dtype they travel in, as
    `begin_send` planned them. `outgoing_messages` puts `wire_dtype` in the header."""

    def __init__(self, chunks: Iterable[ChunkSpec], wire_dtype: str, num_wire_bytes: int) -> None:
        super().__init__(chunks)
        self.wire_dtype = wire_dtype
        # Chunk bytes the whole transfer puts on the wire (KV bytes for "cache").
        self.num_wire_bytes = num_wire_bytes


def check_chunks_fit(
    layout: KVLayout, chunks: list[ChunkSpec], max_message_bytes: int
) -> None:
    """Raises FAILED_PRECONDITION when a chunk could not fit one message (a single token row of
    one layer larger than the message limit), before anything is sent."""
    largest = max(chunk.num_bytes(layout) for chunk in chunks)
    if largest + MESSAGE_OVERHEAD_BYTES > max_message_bytes:
        raise TransferFailedPrecondition(
            f"max_message_bytes: a chunk of {largest} bytes does not fit {max_message_bytes}"
        )


def check_acknowledged(layout: KVLayout, num_tokens: int, num_bytes: int) -> None:
    """Raises DATA_LOSS when the receiver acknowledged another byte count than was sent."""
    expected = layout.kv_bytes(num_tokens)
    if num_bytes != expected:
        raise TransferDataLoss(f"the receiver acknowledged {num_bytes} bytes of {expected}")


def outgoing_messages(
    header: Header,
    chunks: list[ChunkSpec],
    source: KVSource,
    first_token_id: FirstToken,
    should_stop: Callable[[], bool],
    fault: ChunkFault | None = None,
) -> Iterator[Message]:
    """Yields the header, each chunk read from `source` only when it is due, then the commit.

    Each chunk is converted to the wire dtype (the plan's when `chunks` is a ChunkPlan, else the
    header's) before its checksum. Returns early (without a commit) as soon as `should_stop()`
    is true. Raises a TransferError when the source fails or returns the wrong number of bytes,
    FAILED_PRECONDITION for a wire dtype the layout cannot use. `fault` (tests and chaos runs
    only) damages the stream after checksums are computed.
    """
    if isinstance(chunks, ChunkPlan):
        header = replace(header, wire_dtype=chunks.wire_dtype)
    header = replace(header, wire_dtype=check_wire_dtype(header.layout, header.wire_dtype))
    messages = _messages(header, chunks, source, first_token_id, should_stop)
    return fault.apply(messages) if fault is not None else messages


def _messages(
    header: Header,
    chunks: list[ChunkSpec],
    source: KVSource,
    first_token_id: FirstToken,
    should_stop: Callable[[], bool],
) -> Iterator[Message]:
    yield header
    for spec in chunks:
        if should_stop():
            return
        data = _read_chunk(source, spec, header.layout)
        if should_stop():
            return
        data = encode_chunk(header.layout, header.wire_dtype, data)
        yield Chunk(spec=spec, crc32c=checksum(data), data=data)
    if callable(first_token_id):
        first_token_id = first_token_id()
    if should_stop():
        return
    yield Commit(num_chunks=len(chunks), first_token_id=first_token_id)


def _read_chunk(source: KVSource, spec: ChunkSpec, layout: KVLayout) -> bytes | memoryview:
    try:
        raw = source.read(spec)
        view = memoryview(raw).cast("B")
    except Exception as exc:
        raise as_transfer_error(exc, f"reading chunk {spec.seq}") from exc
    expected = spec.num_bytes(layout)
    if view.nbytes != expected:
        raise TransferInternal(
            f"source returned {view.nbytes} bytes for chunk {spec.seq}, expected {expected}"
        )
    # Plain bytes go on a protobuf message without another copy.
    return raw if isinstance(raw, bytes) else view


def via_shm(messages: Iterator[Message], writer: ShmChunkWriter) -> Iterator[Message]:
    """Moves each chunk's bytes into the transfer's shared memory (a pool region or a segment
    of its own); the control stream then carries only where they lie."""
    for message in messages:
        if isinstance(message, Chunk):
            ref = writer.append(message.data)
            message = Chunk(spec=message.spec, crc32c=message.crc32c, data=b"", shm=ref)
        yield message


def begin_send(
    config: KVTransferConfig,
    transfer_id: str,
    layout: KVLayout,
    num_tokens: int,
    cancel: threading.Event | None,
    timeout_s: float | None,
) -> tuple[float, threading.Event, ChunkPlan]:
    """What every sender does first: the deadline (monotonic), a cancel event, and the chunk
    plan checked against the message limit, with `config.wire_dtype` checked against the
    layout. Raises CANCELLED if already cancelled, FAILED_PRECONDITION (naming wire_dtype) when
    the wire dtype would not shrink this layout's KV."""
    deadline = time.monotonic() + (config.timeout_s if timeout_s is None else timeout_s)
    cancel = cancel if cancel is not None else threading.Event()
    wire_dtype = check_wire_dtype(layout, config.wire_dtype)
    # Planned on cache bytes: a wire chunk is never larger than its cache chunk.
    chunks = ChunkPlan(plan_chunks(layout, num_tokens, config.chunk_bytes), wire_dtype,
                       wire_bytes(layout, wire_dtype, num_tokens))
    check_chunks_fit(layout, chunks, config.max_message_bytes)
    if cancel.is_set():
        raise TransferCancelled(f"transfer {transfer_id} was cancelled before it started")
    return deadline, cancel, chunks
