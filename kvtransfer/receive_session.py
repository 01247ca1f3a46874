"""The receiver's validation of one push stream, independent of the transport.

A transport thread creates one ReceiveSession per incoming stream and drives it:
`handle(message)` for each message, then `end()` when the stream closes, or `abort(error)`
when the transport itself fails (sender gone, deadline). Every check runs before the sink is
touched; the rules are written down in kvtransfer/README.md ("Validation"). With a header's
wire dtype other than "cache", each chunk goes back to cache bytes (wire_dtype.py) before the
sink sees it.

Whatever raises has already reported the failure to the transfer's `on_done` (once, via the
TransferTable), so the transport only turns the TransferError into its own status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvtransfer.checksum import checksum
from kvtransfer.errors import (
    TransferCancelled,
    TransferDataLoss,
    TransferError,
    TransferFailedPrecondition,
    TransferInternal,
)
from kvtransfer.layout import ChunkSpec, KVLayout
from kvtransfer.shm_mappings import ShmMappingCache
from kvtransfer.shm_reader import ShmReader, open_shm_reader
from kvtransfer.stream import Chunk, Commit, Header, Message
from kvtransfer.transfer_table import ActiveTransfer, TransferTable
from kvtransfer.wire_dtype import CACHE, WireDecoder, check_wire_dtype, wire_chunk_bytes


class GroupChannel(Protocol):
    """Where one push's `via_group` chunks come from: the receiver's end of a pair group
    (transport "nccl", kvtransfer/dist_receiver.py). Driven by the session's thread."""

    def receive(self, group_id: str, spec: ChunkSpec, num_bytes: int) -> memoryview:
        """Receives the `num_bytes` bytes (computed by the session from the layout) the sender
        sends right after announcing `spec`. BLOCKS until they arrived, the stream is aborted or
        its deadline passed. The view is valid until the next call or `close`. Raises
        TransferError (UNAVAILABLE for an unknown or broken group)."""
        ...

    def close(self, failed: bool) -> None:
        """The push is over; a failed push tears the group down (its byte order is lost)."""
        ...


class ReceiveSession:
    """State of one push stream: awaiting header -> receiving chunks -> committed -> ended.

    Not thread-safe: one transport thread drives it. `abort_stream` is how the receiver's
    `cancel` stops the stream from another thread (e.g. cancels the gRPC call).
    """

    def __init__(
        self,
        table: TransferTable,
        layout: KVLayout,
        abort_stream: Callable[[], None],
        allow_shm: bool = False,
        group_channel: GroupChannel | None = None,
        shm_mappings: ShmMappingCache | None = None,
    ) -> None:
        self._table = table
        self._layout = layout
        self._abort_stream = abort_stream
        # Chunks in a shared-memory segment are accepted only where the config allows shm.
        self._allow_shm = allow_shm
        # The receiver's pool-segment mappings, shared by its pushes (None: per push).
        self._shm_mappings = shm_mappings
        self._segment: ShmReader | None = None
        # Chunks sent over a pair group are accepted only by a receiver made for "nccl".
        self._group_channel = group_channel
        self._header: Header | None = None
        self._active: ActiveTransfer | None = None
        self._commit: Commit | None = None
        self._error: TransferError | None = None
        self._ended = False
        # The header's wire dtype; chunks are turned back into cache bytes unless "cache".
        self._wire_dtype = CACHE
        self._decoder: WireDecoder | None = None
        self._num_wire_bytes = 0
        # Where the next chunk must start in the canonical tiling, and its seq.
        self._next_seq = 0
        self._next_layer = 0
        self._next_token = 0

    @property
    def committed(self) -> bool:
        """A valid commit arrived."""
        return self._commit is not None

    @property
    def num_wire_bytes(self) -> int:
        """Chunk bytes received so far as they travelled (before the wire dtype conversion)."""
        return self._num_wire_bytes

    @property
    def transfer_id(self) -> str | None:
        return None if self._header is None else self._header.transfer_id

    def handle(self, message: Message) -> None:
        """Validates one message and, for a chunk, writes it to the sink. Raises TransferError
        (already reported) when the stream is invalid; the stream must then stop."""
        if self._error is not None:
            raise self._error
        try:
            self._dispatch(message)
        except TransferError as err:
            self._fail(err)
            raise
        except Exception as exc:
            internal = TransferInternal(f"receiving transfer {self.transfer_id}: {exc!r}")
            self._fail(internal)
            raise internal from exc

    def end(self) -> int:
        """The sender closed the stream. Reports success and returns the payload bytes written,
        or raises (already reported) when no commit came or the receiver cancelled."""
        if self._error is not None:
            raise self._error
        if self._commit is None or self._active is None:
            err = TransferDataLoss("the stream ended before the commit")
            self._fail(err)
            raise err
        self._ended = True
        result = self._active.result(None, self._commit.first_token_id)
        if not self._table.finish(self._active, result):
            raise TransferCancelled(f"transfer {self.transfer_id} was cancelled by the receiver")
        return self._active.num_bytes

    def abort(self, error: TransferError) -> None:
        """The transport failed (sender gone, deadline): fails the transfer unless it ended."""
        if self._error is None and not self._ended:
            self._fail(error)

    def _fail(self, error: TransferError) -> None:
        self._error = error
        if self._active is not None:
            self._table.finish(self._active, self._active.result(error))

    def _dispatch(self, message: Message) -> None:
        if self._commit is not None:
            raise TransferDataLoss("a message arrived after the commit")
        if isinstance(message, Header):
            self._on_header(message)
        elif self._header is None:
            raise TransferDataLoss("the stream must start with a header")
        elif isinstance(message, Chunk):
            self._on_chunk(message)
        elif isinstance(message, Commit):
            self._on_commit(message)
        else:
            raise TransferDataLoss(f"unknown message {type(message).__name__}")

    def _on_header(self, header: Header) -> None:
        if self._header is not None:
            raise TransferDataLoss("a second header arrived")
        # Claims the reservation first: an unknown or busy id fails without touching others.
        self._active = self._table.begin(header.transfer_id, self._abort_stream)
        self._header = header
        mismatch = header.layout.mismatch(self._layout)
        if mismatch is not None:
            raise TransferFailedPrecondition(f"layout mismatch: {mismatch}")
        reserved = self._active.expectation.num_tokens
        if header.num_tokens != reserved:
            raise TransferFailedPrecondition(
                f"num_tokens: sender {header.num_tokens}, receiver reserved {reserved}"
            )
        max_chunks = self._layout.num_layers * header.num_tokens
        if not 1 <= header.num_chunks <= max_chunks:
            raise TransferDataLoss(f"num_chunks: {header.num_chunks} is not in [1, {max_chunks}]")
        self._wire_dtype = check_wire_dtype(self._layout, header.wire_dtype)
        if self._wire_dtype != CACHE:
            self._decoder = WireDecoder(self._layout, self._wire_dtype)

    def _on_chunk(self, chunk: Chunk) -> None:
        assert self._header is not None and self._active is not None, "header handled first"
        spec = chunk.spec
        if spec.seq != self._next_seq:
            raise TransferDataLoss(f"chunk seq {spec.seq}: expected {self._next_seq}")
        if spec.seq >= self._header.num_chunks:
            raise TransferDataLoss(f"chunk seq {spec.seq}: the header announced fewer chunks")
        self._check_position(spec)
        expected_bytes = wire_chunk_bytes(self._layout, self._wire_dtype, spec)
        data = self._chunk_bytes(chunk, expected_bytes)
        if data.nbytes != expected_bytes:
            raise TransferDataLoss(
                f"chunk {spec.seq}: {data.nbytes} data bytes, expected {expected_bytes}"
                f" (wire_dtype {self._wire_dtype})"
            )
        if checksum(data) != chunk.crc32c:
            raise TransferDataLoss(f"chunk {spec.seq}: crc32c mismatch")
        self._num_wire_bytes += data.nbytes
        kv = data if self._decoder is None else self._decoder.decode(spec, data)
        self._active.write(spec, kv)
        self._table.add_bytes_written(kv.nbytes)
        kv.release()
        data.release()
        self._advance(spec)

    def _chunk_bytes(self, chunk: Chunk, expected_bytes: int) -> memoryview:
        if chunk.via_group:
            return self._group_bytes(chunk, expected_bytes)
        if chunk.shm is None:
            return memoryview(chunk.data).cast("B")
        assert self._header is not None, "header handled first"
        if not self._allow_shm:
            raise TransferFailedPrecondition("this receiver does not accept the shm transport")
        if chunk.data:
            raise TransferDataLoss(f"chunk {chunk.spec.seq}: both inline data and shm set")
        if chunk.shm.length != expected_bytes:
            raise TransferDataLoss(
                f"chunk {chunk.spec.seq}: shm length {chunk.shm.length}, expected {expected_bytes}"
            )
        if self._segment is None:
            total = self._layout.kv_bytes(self._header.num_tokens)
            self._segment = open_shm_reader(
                self._header.transfer_id, total, chunk.shm, self._shm_mappings
            )
        return self._segment.view(chunk.shm)

    def _group_bytes(self, chunk: Chunk, expected_bytes: int) -> memoryview:
        assert self._header is not None, "header handled first"
        if self._group_channel is None:
            raise TransferFailedPrecondition("this receiver does not accept the nccl transport")
        if chunk.data or chunk.shm is not None:
            raise TransferDataLoss(f"chunk {chunk.spec.seq}: via_group with inline data or shm")
        if not self._header.group_id:
            raise TransferDataLoss(f"chunk {chunk.spec.seq}: via_group but the header names no"
                                   " group")
        return self._group_channel.receive(self._header.group_id, chunk.spec, expected_bytes)

    def close(self) -> None:
        """Releases the shared-memory segment or the pair group, if any. Called by the
        transport when the stream is over, whatever its outcome."""
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        if self._group_channel is not None:
            self._group_channel.close(failed=self._error is not None or not self._ended)
            self._group_channel = None

    def _check_position(self, spec: ChunkSpec) -> None:
        assert self._header is not None, "header handled first"
        num_layers, num_tokens = self._layout.num_layers, self._header.num_tokens
        if (spec.layer_start, spec.token_start) != (self._next_layer, self._next_token):
            raise TransferDataLoss(
                f"chunk {spec.seq} starts at layer {spec.layer_start} token {spec.token_start},"
                f" expected layer {self._next_layer} token {self._next_token}"
            )
        if not spec.layer_start < spec.layer_end <= num_layers:
            raise TransferDataLoss(
                f"chunk {spec.seq}: layers [{spec.layer_start}, {spec.layer_end})"
                f" not within [0, {num_layers})"
            )
        if not spec.token_start < spec.token_end <= num_tokens:
            raise TransferDataLoss(
                f"chunk {spec.seq}: tokens [{spec.token_start}, {spec.token_end})"
                f" not within [0, {num_tokens})"
            )
        if spec.num_layers > 1 and spec.num_tokens != num_tokens:
            raise TransferDataLoss(f"chunk {spec.seq}: a multi-layer chunk must cover all tokens")

    def _advance(self, spec: ChunkSpec) -> None:
        assert self._header is not None, "header handled first"
        self._next_seq += 1
        if spec.token_end == self._header.num_tokens:
            self._next_layer, self._next_token = spec.layer_end, 0
        else:
            self._next_token = spec.token_end

    def _on_commit(self, commit: Commit) -> None:
        assert self._header is not None, "header handled first"
        if commit.num_chunks != self._next_seq or commit.num_chunks != self._header.num_chunks:
            raise TransferDataLoss(
                f"commit num_chunks {commit.num_chunks}: received {self._next_seq},"
                f" header announced {self._header.num_chunks}"
            )
        if self._next_layer != self._layout.num_layers:
            raise TransferDataLoss(
                f"commit after layer {self._next_layer} token {self._next_token}:"
                f" the KV of {self._layout.num_layers} layers is incomplete"
            )
        self._commit = commit
