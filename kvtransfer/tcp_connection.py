"""The sender's end of one transfer's side channel connection: the push's request iterator
(the header, then, once every frame went out, the commit listing the chunks' CRC32C) and a
writer thread that sends each chunk as one frame.

Why a writer thread: sending a chunk's bytes overlaps reading and checksumming the next one
(on gRPC's request thread, which runs the iterator). The writer first waits for the listener's
acceptance of the hello (the push starts meanwhile), then sends frames in stream order; at most
MAX_QUEUED_CHUNKS chunks (views of the source: nothing is copied) wait for it. Before the
commit the iterator waits for the writer to finish and ends the frames (a half-close, so a
receiver still expecting a frame sees the end instead of waiting), which also makes a refused
connection or a failed send known before the push could end.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import Iterator

from kvtransfer.errors import TransferUnavailable
from kvtransfer.grpc_codec import encode_side_channel_commit, encode_side_channel_header
from kvtransfer.stream import Chunk, Commit, Header, Message
from kvtransfer.tcp_frames import ACCEPT, encode_frame, recv_exactly, shut

logger = logging.getLogger(__name__)

# Chunks handed to the writer and not yet sent, the one being sent included.
MAX_QUEUED_CHUNKS = 3


class SideChannelConnection:
    """Owns the socket and the writer thread. `stream` runs on gRPC's request thread, `close`
    on the sender's calling thread; both may run at once."""

    def __init__(self, sock: socket.socket, address: str, transfer_id: str) -> None:
        self._sock = sock
        self.address = address
        self._transfer_id = transfer_id
        self._cond = threading.Condition()
        self._queue: deque[Chunk] = deque()
        # Closed, or a send failed: nothing more is sent.
        self._stopped = False
        self._sending = False
        self.num_bytes_sent = 0
        # The listener closed the connection instead of accepting its ticket.
        self.refused = False
        # Why a send failed, if one did (the receiver's status then tells what happened).
        self.broken: str | None = None
        self._writer = threading.Thread(target=self._write_loop, name="kv-side-send",
                                        daemon=True)
        self._writer.start()

    def stream(self, messages: Iterator[Message]) -> Iterator[bytes]:
        """The push's request iterator: the header announcing the side channel; each chunk
        handed to the writer; then, once the writer sent every frame, the commit with the
        chunks' CRC32C. Once a send failed the stream ends early, without a commit: the
        receiver, which sees the connection fail or the stream end, fails the transfer and says
        why. Raises UNAVAILABLE when the listener refused the connection (the receiver, waiting
        for a connection, would not know)."""
        crc32cs: list[int] = []
        for message in messages:
            if isinstance(message, Header):
                yield encode_side_channel_header(message)
            elif isinstance(message, Chunk):
                if not self._enqueue(message):
                    self._raise_if_refused()
                    return
                crc32cs.append(message.crc32c)
            elif isinstance(message, Commit):
                if not self._drain():
                    self._raise_if_refused()
                    return
                yield encode_side_channel_commit(message, crc32cs)

    def close(self) -> None:
        """Stops the writer (waking a send blocked on the socket), waits for it, closes the
        socket; queued chunks are dropped. Blocks only while the writer returns. Idempotent."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()
        shut(self._sock)
        self._writer.join()
        self._sock.close()

    def _raise_if_refused(self) -> None:
        if self.refused:
            raise TransferUnavailable(f"the side channel at {self.address} refused the ticket "
                                      f"of transfer {self._transfer_id}")

    def _drain(self) -> bool:
        """Waits until the writer sent every queued frame, then ends the frames (half-close);
        False once stopped."""
        with self._cond:
            while self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
        try:
            # The raw socket's half-close: no TLS close_notify, which would need the writer's
            # side of the TLS state; the receiver reads the end of the stream either way.
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
        except OSError as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def _enqueue(self, chunk: Chunk) -> bool:
        """Hands a chunk to the writer, waiting while MAX_QUEUED_CHUNKS are queued; False once
        stopped."""
        with self._cond:
            while len(self._queue) >= MAX_QUEUED_CHUNKS and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._queue.append(chunk)
            self._cond.notify_all()
            return True

    def _write_loop(self) -> None:
        if not self._await_accept():
            with self._cond:
                self.refused = not self._stopped
                self._stopped = True
                self._cond.notify_all()
            return
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                chunk = self._queue[0]
                self._sending = True
            sent = self._send(chunk)
            with self._cond:
                self._sending = False
                if self._queue:  # `close` may have dropped it
                    self._queue.popleft()
                self._stopped = self._stopped or not sent
                self._cond.notify_all()
            if not sent:
                return

    def _await_accept(self) -> bool:
        answer = bytearray(len(ACCEPT))
        try:
            received = recv_exactly(self._sock, memoryview(answer))
        except OSError as exc:
            logger.info("KV side channel to %s: no acceptance: %s", self.address, exc)
            return False
        return received == len(ACCEPT) and answer == ACCEPT

    def _send(self, chunk: Chunk) -> bool:
        data = memoryview(chunk.data).cast("B")
        head = encode_frame(chunk.spec, chunk.crc32c, data.nbytes)
        try:
            if isinstance(self._sock, ssl.SSLSocket):
                self._sock.sendall(head)
                self._sock.sendall(data)
            else:
                # Header and payload in one call: no separate small segment for the header.
                sent = self._sock.sendmsg([head, data])
                if sent < len(head):
                    self._sock.sendall(head[sent:])
                    sent = len(head)
                if sent - len(head) < data.nbytes:
                    self._sock.sendall(data[sent - len(head) :])
        except OSError as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            logger.info("KV side channel to %s broke at chunk %d: %s", self.address,
                        chunk.spec.seq, self.broken)
            return False
        self.num_bytes_sent += data.nbytes
        return True
