"""The TCP side channel's parts: frames, one-time tickets, the listener refusing what it must,
and one push's reads checking every length before anything is read or allocated."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from kvtransfer import ChunkSpec, TransferError
from kvtransfer.errors import TransferDataLoss
from kvtransfer.stream import Header
from kvtransfer.tcp_buffers import BufferPool
from kvtransfer.tcp_frames import (
    FRAME,
    HELLO,
    HELLO_MAGIC,
    TICKET_BYTES,
    HelloError,
    decode_frame,
    encode_frame,
    encode_hello,
    read_hello,
)
from kvtransfer.tcp_receiver_side import PushSideChannel, SideChannelBroken
from kvtransfer.tcp_tickets import TicketBook
from pdserve.errors import StatusCode
from tests.unit.test_kv_grpc_transport import LAYOUT, NUM_TOKENS, WAIT_S

TICKET = bytes(range(TICKET_BYTES))


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(WAIT_S)
    right.settimeout(WAIT_S)
    yield left, right
    left.close()
    right.close()


def test_hello_round_trip(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    left.sendall(encode_hello("transfer-é", TICKET))
    assert read_hello(right) == ("transfer-é", TICKET)


@pytest.mark.parametrize("transfer_id,ticket", [("", TICKET), ("x" * 257, TICKET),
                                                 ("t", TICKET[:16])])
def test_hello_refuses_bad_sizes_when_encoding(transfer_id: str, ticket: bytes) -> None:
    with pytest.raises(ValueError):
        encode_hello(transfer_id, ticket)


@pytest.mark.parametrize("head", [
    HELLO.pack(b"HTTP", 1, 4, TICKET),
    HELLO.pack(HELLO_MAGIC, 2, 4, TICKET),
    HELLO.pack(HELLO_MAGIC, 1, 0, TICKET),
    HELLO.pack(HELLO_MAGIC, 1, 60000, TICKET),
])
def test_bad_hello_is_refused_before_reading_the_id(
    socket_pair: tuple[socket.socket, socket.socket], head: bytes
) -> None:
    left, right = socket_pair
    # No id follows: a reader that trusted the length would block here.
    left.sendall(head)
    with pytest.raises(HelloError):
        read_hello(right)


def test_hello_cut_short_is_refused(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    left.sendall(encode_hello("abc", TICKET)[:-1])
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(HelloError, match="closed"):
        read_hello(right)


def test_frame_header_round_trip_and_magic() -> None:
    assert FRAME.size == 36
    spec = ChunkSpec(7, 1, 3, 5, 9)
    head = decode_frame(encode_frame(spec, 0xDEADBEEF, 2**40))
    assert (head.spec, head.crc32c, head.num_bytes) == (spec, 0xDEADBEEF, 2**40)
    with pytest.raises(ValueError, match="not a chunk frame"):
        decode_frame(struct.pack("<4sIIIIIIQ", b"XXXX", 0, 0, 0, 0, 0, 0, 0))


def test_ticket_admits_one_connection_for_its_transfer_only() -> None:
    book = TicketBook(ttl_s=60.0)
    ticket = book.mint("t1")
    assert len(ticket) == TICKET_BYTES and ticket != book.mint("t2")
    first, second, third = (socket.socket() for _ in range(3))
    assert not book.redeem("t1", bytes(TICKET_BYTES), first)  # wrong ticket
    assert not book.redeem("t2", ticket, first)  # another transfer's ticket
    assert not book.redeem("nobody", ticket, first)
    assert book.redeem("t1", ticket, first)
    assert not book.redeem("t1", ticket, second)  # reused
    assert book.claim("t1") is first
    assert book.claim("t1") is None and not book.redeem("t1", ticket, third)
    assert book.num_entries == 1  # t2's ticket
    book.close()
    assert book.num_entries == 0 and second.fileno() != -1
    for sock in (first, second, third):
        sock.close()


def test_expired_tickets_admit_nothing_and_parked_connections_are_closed() -> None:
    expired = TicketBook(ttl_s=0.0)
    ticket = expired.mint("t1")
    sock = socket.socket()
    assert not expired.admissible("t1", ticket) and not expired.redeem("t1", ticket, sock)
    expired.sweep()
    assert expired.num_entries == 0
    sock.close()
    book = TicketBook(ttl_s=60.0)
    parked = socket.socket()
    assert book.redeem("t1", book.mint("t1"), parked)
    book.mint("t1")  # a new ticket for the transfer replaces the old one
    assert parked.fileno() == -1
    assert book.redeem("t2", book.mint("t2"), parked2 := socket.socket())
    book.close()
    assert parked2.fileno() == -1
    with pytest.raises(TransferError) as caught:
        book.mint("t3")
    assert caught.value.code is StatusCode.UNAVAILABLE


def test_ticket_book_is_bounded() -> None:
    book = TicketBook(ttl_s=60.0, max_tickets=2)
    book.mint("a")
    book.mint("b")
    with pytest.raises(TransferError) as caught:
        book.mint("c")
    assert caught.value.code is StatusCode.RESOURCE_EXHAUSTED
    book.mint("a")  # replacing one does not count twice
    assert book.num_entries == 2


# One push's reads, against a connection parked in a ticket book (a socket pair end).
MAX_CHUNK_BYTES = 64 * 1024
SPEC = ChunkSpec(0, 0, 1, 0, NUM_TOKENS)
SPEC_BYTES = SPEC.num_bytes(LAYOUT)


def make_push(max_chunk_bytes: int, pool: BufferPool | None = None
              ) -> tuple[PushSideChannel, socket.socket, socket.socket, BufferPool]:
    """A push that claimed its connection (one end of a socket pair; the other is returned)."""
    book, pool = TicketBook(ttl_s=60.0), pool or BufferPool()
    peer, mine = socket.socketpair()
    assert book.redeem("t1", book.mint("t1"), mine)
    channel = PushSideChannel(book, pool, LAYOUT, max_chunk_bytes)
    channel.claim(Header("t1", LAYOUT, NUM_TOKENS, 4))
    return channel, peer, mine, pool


@pytest.fixture
def push() -> Iterator[tuple[PushSideChannel, socket.socket, BufferPool]]:
    channel, peer, mine, pool = make_push(MAX_CHUNK_BYTES)
    yield channel, peer, pool
    channel.close()
    peer.close()
    assert mine.fileno() == -1  # the push closed its connection


def frame(spec: ChunkSpec = SPEC, crc: int = 5, num_bytes: int | None = None) -> bytes:
    """A frame header for `spec` (its true size unless `num_bytes` says otherwise)."""
    return encode_frame(spec, crc, spec.num_bytes(LAYOUT) if num_bytes is None else num_bytes)


def test_reads_chunks_into_buffers_reused_by_the_next_push() -> None:
    pool = BufferPool()
    for attempt in range(2):
        channel, peer, _, _ = make_push(MAX_CHUNK_BYTES, pool)
        for seq in range(LAYOUT.num_layers):
            payload = bytes([seq + attempt]) * SPEC_BYTES
            spec = ChunkSpec(seq, seq, seq + 1, 0, NUM_TOKENS)
            peer.sendall(frame(spec, crc=seq) + payload)
            chunk = channel.next_chunk()
            assert (chunk.spec, chunk.crc32c, bytes(chunk.data)) == (spec, seq, payload)
        channel.check_commit(list(range(LAYOUT.num_layers)))
        with pytest.raises(TransferDataLoss, match="checksums"):
            channel.check_commit([0, 1, 2, 4])
        channel.close()
        peer.close()
    # Eight chunks in two pushes: read-ahead holds at most three buffers at once, all reused.
    assert 1 <= pool.num_allocated <= 3


@pytest.mark.parametrize("head", [
    frame(num_bytes=2**40),  # beyond the chunk limit
    frame(num_bytes=SPEC_BYTES + LAYOUT.token_row_bytes),  # not the chunk's size
    frame(num_bytes=SPEC_BYTES - 1),
    frame(num_bytes=0),
    frame(ChunkSpec(0, 0, LAYOUT.num_layers + 1, 0, NUM_TOKENS)),  # beyond the layers
    frame(ChunkSpec(0, 0, 1, 0, NUM_TOKENS + 1)),  # beyond the reserved tokens
    frame(ChunkSpec(0, 1, 1, 0, NUM_TOKENS)),  # empty
    frame(ChunkSpec(0, 0, 2, 0, NUM_TOKENS)),  # within the layout, above the chunk limit
    struct.pack("<4sIIIIIIQ", b"JUNK", 0, 0, 1, 0, NUM_TOKENS, 5, SPEC_BYTES),
])
def test_frame_header_is_checked_before_allocation(head: bytes) -> None:
    channel, peer, _, pool = make_push(max_chunk_bytes=SPEC_BYTES)
    try:
        # A payload follows that a reader trusting the header would try to read.
        peer.sendall(head + bytes(2 * SPEC_BYTES))
        with pytest.raises(TransferDataLoss):
            channel.next_chunk()
        assert pool.num_allocated == 0
    finally:
        channel.close()
        peer.close()


def test_frames_beyond_the_transfer_are_refused(
    push: tuple[PushSideChannel, socket.socket, BufferPool],
) -> None:
    channel, peer, _ = push
    for _ in range(LAYOUT.num_layers):  # the whole KV, then one frame more (a duplicate)
        peer.sendall(frame() + bytes(SPEC_BYTES))
        channel.next_chunk()
    peer.sendall(frame() + bytes(SPEC_BYTES))
    with pytest.raises(TransferDataLoss, match="what the transfer has left"):
        channel.next_chunk()


def test_truncated_payload_is_a_broken_side_channel(
    push: tuple[PushSideChannel, socket.socket, BufferPool],
) -> None:
    channel, peer, _ = push
    peer.sendall(frame() + bytes(SPEC_BYTES // 2))
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(SideChannelBroken, match=f"after {SPEC_BYTES // 2} of {SPEC_BYTES}"):
        channel.next_chunk()


def test_abort_wakes_a_blocked_read(
    push: tuple[PushSideChannel, socket.socket, BufferPool],
) -> None:
    channel, peer, _ = push
    errors: list[BaseException] = []
    started = threading.Event()

    def read() -> None:
        started.set()
        try:
            channel.next_chunk()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    assert started.wait(WAIT_S)
    peer.sendall(frame())  # then nothing: the read blocks
    channel.abort()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    [error] = errors
    assert isinstance(error, SideChannelBroken)


def test_claim_waits_for_a_minted_ticket_to_be_presented() -> None:
    book = TicketBook(ttl_s=60.0)
    ticket = book.mint("t1")
    claimed: list[socket.socket | None] = []
    waiting = threading.Thread(target=lambda: claimed.append(book.claim("t1", WAIT_S)))
    waiting.start()
    sock = socket.socket()
    assert book.redeem("t1", ticket, sock)  # the hello arrives while the claim waits
    waiting.join(WAIT_S)
    assert claimed == [sock] and book.num_entries == 0
    sock.close()
    book.mint("t2")
    stopped = threading.Event()
    stopped.set()
    assert book.claim("t2", WAIT_S, stopped.is_set) is None  # a cancelled push stops waiting
    assert book.claim("never-minted", WAIT_S) is None  # nothing to wait for


def test_claim_without_a_presented_ticket_fails() -> None:
    book = TicketBook(ttl_s=60.0)
    book.mint("t1")  # minted, but no connection presented it
    channel = PushSideChannel(book, BufferPool(), LAYOUT, MAX_CHUNK_BYTES)
    with pytest.raises(TransferError) as caught:
        channel.claim(Header("t1", LAYOUT, NUM_TOKENS, 4))
    assert caught.value.code is StatusCode.FAILED_PRECONDITION

