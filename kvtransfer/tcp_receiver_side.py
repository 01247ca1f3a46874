"""The decode replica's end of the TCP side channel: the host (tickets, listener, receive
buffers) a GrpcReceiver keeps while serving, and the channel of one push.

Life of a push over the side channel (driven by the push's gRPC thread):
1. `OpenSideChannel` minted a ticket; the sender's connection presents it and is parked (the
   sender starts the push meanwhile);
2. the header (validated by the ReceiveSession first) sets `side_channel`: `claim` takes the
   parked connection of that transfer (waiting for it briefly), or fails the push;
3. the claimed connection's FrameReader reads frames ahead, each header checked against the
   layout before its payload is read (`recv_into` a reused buffer);
4. the push's thread takes the header's `num_chunks` frames (`next_chunk`) and hands each to
   the ReceiveSession, which checks order, coverage and CRC32C and writes the sink from the
   frame's buffer; the gRPC stream carries no chunk messages meanwhile;
5. the commit's list of CRC32C must equal the frames' (`check_commit`): the control plane
   vouches for every chunk the data connection brought;
6. the push ends (whatever the outcome): `close` stops the reader and closes the connection.
   `abort` (any thread: cancel, deadline, receiver stop) shuts the socket so a blocked read
   returns at once.
"""

from __future__ import annotations

import threading

from kvtransfer.errors import TransferCancelled, TransferDataLoss, TransferFailedPrecondition
from kvtransfer.layout import KVLayout
from kvtransfer.stream import Chunk, Header
from kvtransfer.tcp_buffers import BufferPool
from kvtransfer.tcp_frame_reader import FrameReader, SideChannelBroken
from kvtransfer.tcp_frames import MAX_TRANSFER_ID_BYTES
from kvtransfer.tcp_listener import SideChannelListener, server_tls_context
from kvtransfer.tcp_tickets import TicketBook
from kvtransfer.wire_dtype import check_wire_dtype
from pdserve.config import KVTransferConfig

__all__ = ["BufferPool", "PushSideChannel", "SideChannelBroken", "SideChannelHost"]

# Bound on a hello's arrival after the connection opened.
_GREETING_TIMEOUT_S = 5.0


class SideChannelHost:
    """The side channel of one receiver. `start`/`stop` from the receiver's owner; `mint` and
    `push_channel` from gRPC threads."""

    def __init__(self, config: KVTransferConfig, layout: KVLayout) -> None:
        self.tickets = TicketBook(config.timeout_s)
        self.buffers = BufferPool()
        tls = None
        if config.tls_cert_file and config.tls_key_file:
            tls = server_tls_context(config.tls_cert_file, config.tls_key_file)
        self._greeting_timeout_s = min(config.timeout_s, _GREETING_TIMEOUT_S)
        self.listener = SideChannelListener(config.host, self.tickets, tls,
                                            self._greeting_timeout_s)
        self._layout = layout
        # A frame is bounded like an inline chunk (the sender checks chunks against it too).
        self._max_chunk_bytes = config.max_message_bytes

    @property
    def address(self) -> str:
        """"host:port" of the listener (valid after `start`)."""
        return self.listener.address

    def start(self) -> None:
        """Raises RuntimeError when the host cannot be bound."""
        self.listener.start()

    def stop(self) -> None:
        """Stops accepting, waits for the listener's threads, closes parked connections."""
        self.listener.stop()
        self.tickets.close()

    def mint(self, transfer_id: str) -> bytes:
        """A one-time ticket for `transfer_id`. Raises FAILED_PRECONDITION for a malformed id,
        RESOURCE_EXHAUSTED or UNAVAILABLE (see TicketBook.mint)."""
        if not 1 <= len(transfer_id.encode()) <= MAX_TRANSFER_ID_BYTES:
            raise TransferFailedPrecondition(
                f"transfer_id: must be 1..{MAX_TRANSFER_ID_BYTES} bytes for a side channel"
            )
        return self.tickets.mint(transfer_id)

    def push_channel(self) -> PushSideChannel:
        return PushSideChannel(self.tickets, self.buffers, self._layout, self._max_chunk_bytes,
                               self._greeting_timeout_s)


class PushSideChannel:
    """The side channel of one push: `claim`, `next_chunk`, `check_commit` and `close` on the
    push's thread, `abort` from any thread."""

    def __init__(
        self,
        tickets: TicketBook,
        buffers: BufferPool,
        layout: KVLayout,
        max_chunk_bytes: int,
        claim_wait_s: float = 0.0,
    ) -> None:
        # How long a claim waits for a ticket minted but not presented yet.
        self._claim_wait_s = claim_wait_s
        self._tickets = tickets
        self._buffers = buffers
        self._layout = layout
        self._max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._reader: FrameReader | None = None
        self._aborted = False
        # CRC32C of each frame handed out, in order (the commit must list the same).
        self._crc32cs: list[int] = []

    @property
    def claimed(self) -> bool:
        """The push's header announced the side channel and its connection was claimed."""
        return self._reader is not None

    def claim(self, header: Header) -> None:
        """Takes the connection that presented the ticket of `header.transfer_id` (the header
        is already validated) and starts reading its frames. BLOCKS while the ticket, minted,
        is not presented yet (the sender starts the push as it sends its hello), at most the
        greeting timeout. Raises FAILED_PRECONDITION when no connection presented it, CANCELLED
        when the push was aborted."""
        connection = self._tickets.claim(header.transfer_id, self._claim_wait_s,
                                         lambda: self._aborted)
        if connection is None and self._aborted:
            raise TransferCancelled(f"transfer {header.transfer_id}: the push was aborted")
        if connection is None:
            raise TransferFailedPrecondition(
                f"transfer {header.transfer_id}: no side channel connection presented its ticket"
                " (or the ticket expired)"
            )
        wire_dtype = check_wire_dtype(self._layout, header.wire_dtype)
        with self._lock:
            if self._aborted:
                connection.close()
                raise TransferCancelled(f"transfer {header.transfer_id}: the push was aborted")
            self._reader = FrameReader(connection, self._buffers, self._layout,
                                       header.num_tokens, wire_dtype, self._max_chunk_bytes)

    def next_chunk(self) -> Chunk:
        """The next chunk off the side channel, its data a view valid until the next call.
        BLOCKS until its frame was read. Raises DATA_LOSS (a SideChannelBroken when the
        connection closed or failed)."""
        assert self._reader is not None, "claimed first"
        frame, data = self._reader.next_frame()
        self._crc32cs.append(frame.crc32c)
        return Chunk(frame.spec, frame.crc32c, data)

    def check_commit(self, chunk_crc32cs: list[int]) -> None:
        """Raises DATA_LOSS unless the commit's CRC32C list equals the frames'."""
        if chunk_crc32cs != self._crc32cs:
            raise TransferDataLoss(
                f"the commit lists {len(chunk_crc32cs)} chunk checksums that differ from those "
                f"of the {len(self._crc32cs)} frames received"
            )

    def abort(self) -> None:
        """Wakes a blocked read (the push is over: cancel, deadline, stop or its end)."""
        with self._lock:
            self._aborted = True
            reader = self._reader
        if reader is not None:
            reader.abort()

    def close(self) -> None:
        """Stops the reader, closes the connection and returns the buffers; the push is over."""
        with self._lock:
            self._aborted = True
            reader = self._reader
        if reader is not None:
            reader.close()
