"""The receiver's reader of one push's side channel connection: a thread that reads chunk frames
ahead, in order, so receiving a chunk's bytes overlaps checking and writing the previous one.

Before a frame's payload is read, its header is checked against the negotiated layout: the
ranges lie within the layout's layers and the header's tokens, the length is exactly the
chunk's size by layout and wire dtype, at most the chunk limit and at most what the transfer
has left. Only then does the payload get a buffer (from the receiver's BufferPool, reused) and
`recv_into` fills it. The push's thread hands each frame to the ReceiveSession, which checks
order, coverage and CRC32C before the sink sees it (tcp_receiver_side.py).
"""

from __future__ import annotations

import socket
import threading
from collections import deque

from kvtransfer.errors import TransferDataLoss
from kvtransfer.layout import KVLayout
from kvtransfer.tcp_buffers import BufferPool
from kvtransfer.tcp_frames import FRAME, FrameHeader, decode_frame, recv_exactly, shut
from kvtransfer.wire_dtype import wire_bytes, wire_chunk_bytes

# Frames read and not yet taken by the push; with the one being read and the one lent out, a
# push holds at most MAX_READY_FRAMES + 2 buffers.
MAX_READY_FRAMES = 1


class SideChannelBroken(TransferDataLoss):
    """The side channel connection closed or failed in the middle of a push."""


class FrameReader:
    """Owns the connection and the reader thread. `next_frame` and `close` run on the push's
    thread, `abort` on any thread."""

    def __init__(
        self,
        sock: socket.socket,
        buffers: BufferPool,
        layout: KVLayout,
        num_tokens: int,
        wire_dtype: str,
        max_chunk_bytes: int,
    ) -> None:
        self._sock = sock
        self._buffers = buffers
        self._layout = layout
        self._num_tokens = num_tokens
        self._wire_dtype = wire_dtype
        self._bytes_left = wire_bytes(layout, wire_dtype, num_tokens)
        self._max_chunk_bytes = max_chunk_bytes
        self._cond = threading.Condition()
        self._ready: deque[tuple[FrameHeader, bytearray]] = deque()
        self._free: list[bytearray] = []
        self._lent: bytearray | None = None
        self._error: TransferDataLoss | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._read_loop, name="kv-side-recv", daemon=True)
        self._thread.start()

    def next_frame(self) -> tuple[FrameHeader, memoryview]:
        """The next frame and its payload (valid until the next call). BLOCKS until it was
        read. Raises the reader's DATA_LOSS (a SideChannelBroken when the connection closed or
        failed) once the frames read before it were taken."""
        with self._cond:
            if self._lent is not None:
                self._free.append(self._lent)
                self._lent = None
                self._cond.notify_all()
            while not self._ready and self._error is None:
                self._cond.wait()
            if not self._ready:
                assert self._error is not None, "woken by an error"
                raise self._error
            frame, buffer = self._ready.popleft()
            self._lent = buffer
            self._cond.notify_all()
        return frame, memoryview(buffer)[: frame.num_bytes]

    def abort(self) -> None:
        """Wakes the reader (and so a push waiting for a frame): the push is over."""
        shut(self._sock)

    def close(self) -> None:
        """Stops and waits for the reader, closes the connection, returns the buffers."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        shut(self._sock)
        self._thread.join()
        self._sock.close()
        with self._cond:
            buffers = [buffer for _, buffer in self._ready] + self._free
            if self._lent is not None:
                buffers.append(self._lent)
            self._ready.clear()
            self._free.clear()
            self._lent = None
        for buffer in buffers:
            self._buffers.give(buffer)

    def _read_loop(self) -> None:
        head = bytearray(FRAME.size)
        while True:
            with self._cond:
                while len(self._ready) >= MAX_READY_FRAMES and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                self._read_frame(head)
            except TransferDataLoss as err:
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return

    def _read_frame(self, head: bytearray) -> None:
        self._fill(memoryview(head), "a frame header")
        try:
            frame = decode_frame(head)
        except ValueError as exc:
            raise TransferDataLoss(f"side channel: {exc}") from exc
        self._check(frame)
        buffer = self._buffer(frame.num_bytes)
        try:
            self._fill(memoryview(buffer)[: frame.num_bytes], f"chunk {frame.spec.seq}")
        except TransferDataLoss:
            with self._cond:
                self._free.append(buffer)
            raise
        self._bytes_left -= frame.num_bytes
        with self._cond:
            self._ready.append((frame, buffer))
            self._cond.notify_all()

    def _check(self, frame: FrameHeader) -> None:
        spec, num_layers, num_tokens = frame.spec, self._layout.num_layers, self._num_tokens
        if not (spec.layer_start < spec.layer_end <= num_layers
                and spec.token_start < spec.token_end <= num_tokens):
            raise TransferDataLoss(
                f"chunk {spec.seq}: layers [{spec.layer_start}, {spec.layer_end}) x tokens "
                f"[{spec.token_start}, {spec.token_end}) not within {num_layers} x {num_tokens}"
            )
        expected = wire_chunk_bytes(self._layout, self._wire_dtype, spec)
        limit = min(self._max_chunk_bytes, self._bytes_left)
        if frame.num_bytes != expected or expected > limit:
            raise TransferDataLoss(
                f"chunk {spec.seq}: a frame of {frame.num_bytes} bytes, expected {expected} "
                f"within {limit} (the chunk limit, or what the transfer has left)"
            )

    def _buffer(self, num_bytes: int) -> bytearray:
        with self._cond:
            for index, buffer in enumerate(self._free):
                if len(buffer) >= num_bytes:
                    return self._free.pop(index)
        return self._buffers.take(num_bytes)

    def _fill(self, view: memoryview, what: str) -> None:
        try:
            received = recv_exactly(self._sock, view)
        except OSError as exc:
            raise SideChannelBroken(f"side channel failed reading {what}: {exc}") from exc
        if received != view.nbytes:
            raise SideChannelBroken(
                f"side channel closed after {received} of {view.nbytes} bytes of {what}"
            )
