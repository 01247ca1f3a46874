"""The wire format of the TCP side channel (transport "grpc", `kv_transfer.side_channel: tcp`):
the hello a sender presents first, the receiver's one-word acceptance, and the fixed header of
each chunk frame (the chunk's seq, ranges, CRC32C and length); plus the socket helpers both ends
share.

Every integer is little-endian with an explicit size (`struct`); see kvtransfer/README.md, "The
TCP side channel". Nothing here allocates from a length read off the wire: the hello's transfer
id length is bounded before it is read, and a frame's length is checked by the reader against
the chunk's size by layout before its payload is read.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass

from kvtransfer.layout import ChunkSpec

HELLO_MAGIC = b"PDKV"
FRAME_MAGIC = b"PDKC"
# The receiver's answer once the ticket was accepted; a refused connection is just closed.
ACCEPT = b"PDOK"
SIDE_CHANNEL_VERSION = 1
TICKET_BYTES = 32
# Bound on the transfer id a hello may carry (router ids are 32 hex digits).
MAX_TRANSFER_ID_BYTES = 256
# magic, version, transfer id length, ticket; the transfer id (UTF-8) follows.
HELLO = struct.Struct(f"<4sHH{TICKET_BYTES}s")
# magic, seq, layer_start, layer_end, token_start, token_end, crc32c of the payload, payload
# length; the payload follows.
FRAME = struct.Struct("<4sIIIIIIQ")
# Socket buffers asked for at both ends (the kernel may cap them at net.core.[rw]mem_max).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


class HelloError(ValueError):
    """A hello that is malformed (bad magic, version or length) or ends early."""


@dataclass(frozen=True)
class FrameHeader:
    spec: ChunkSpec
    crc32c: int
    num_bytes: int


def encode_hello(transfer_id: str, ticket: bytes) -> bytes:
    """The hello for `transfer_id`; raises ValueError for an id or ticket of the wrong size."""
    encoded = transfer_id.encode()
    if not 1 <= len(encoded) <= MAX_TRANSFER_ID_BYTES:
        raise ValueError(f"transfer_id: {len(encoded)} bytes, must be 1..{MAX_TRANSFER_ID_BYTES}")
    if len(ticket) != TICKET_BYTES:
        raise ValueError(f"ticket: {len(ticket)} bytes, must be {TICKET_BYTES}")
    return HELLO.pack(HELLO_MAGIC, SIDE_CHANNEL_VERSION, len(encoded), ticket) + encoded


def hello_length(head: bytes | bytearray) -> int:
    """The whole hello's length, from its first HELLO.size bytes (checked before the transfer
    id is read). Raises HelloError for a bad magic, version or id length."""
    magic, version, id_length, _ = HELLO.unpack(head)
    if magic != HELLO_MAGIC or version != SIDE_CHANNEL_VERSION:
        raise HelloError(f"not a side channel hello (magic {bytes(magic)!r}, version {version})")
    if not 1 <= id_length <= MAX_TRANSFER_ID_BYTES:
        raise HelloError(f"transfer id length {id_length} is not in 1..{MAX_TRANSFER_ID_BYTES}")
    return HELLO.size + int(id_length)


def parse_hello(hello: bytes | bytearray) -> tuple[str, bytes]:
    """(transfer id, ticket) of a whole hello. Raises HelloError."""
    if len(hello) < HELLO.size or len(hello) != hello_length(hello[: HELLO.size]):
        raise HelloError("a hello of the wrong length")
    ticket = bytes(hello[HELLO.size - TICKET_BYTES : HELLO.size])
    try:
        return bytes(hello[HELLO.size :]).decode(), ticket
    except UnicodeDecodeError as exc:
        raise HelloError("the transfer id is not UTF-8") from exc


def read_hello(sock: socket.socket) -> tuple[str, bytes]:
    """Reads a hello from a blocking socket; returns (transfer id, ticket). Raises HelloError,
    or OSError when the socket fails or times out."""
    hello = bytearray(HELLO.size)
    if recv_exactly(sock, memoryview(hello)) != HELLO.size:
        raise HelloError("the connection closed inside the hello")
    rest = bytearray(hello_length(hello) - HELLO.size)
    if recv_exactly(sock, memoryview(rest)) != len(rest):
        raise HelloError("the connection closed inside the hello")
    return parse_hello(hello + rest)


def encode_frame(spec: ChunkSpec, crc32c: int, num_bytes: int) -> bytes:
    return FRAME.pack(FRAME_MAGIC, spec.seq, spec.layer_start, spec.layer_end, spec.token_start,
                      spec.token_end, crc32c, num_bytes)


def decode_frame(head: bytes | bytearray | memoryview) -> FrameHeader:
    """Raises ValueError when the bytes are not a frame header."""
    magic, seq, layer_start, layer_end, token_start, token_end, crc32c, num_bytes = \
        FRAME.unpack(head)
    if magic != FRAME_MAGIC:
        raise ValueError(f"not a chunk frame (magic {bytes(magic)!r})")
    return FrameHeader(ChunkSpec(seq, layer_start, layer_end, token_start, token_end), crc32c,
                       num_bytes)


def recv_exactly(sock: socket.socket, view: memoryview) -> int:
    """Fills `view` from `sock`; returns the bytes read, fewer only when the peer closed (or
    the socket was shut down). Raises OSError (socket.timeout included)."""
    total = view.nbytes
    received = 0
    # MSG_WAITALL lets the kernel fill a large buffer in one call; TLS sockets take no flags.
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    while received < total:
        count = sock.recv_into(view[received:], total - received, flags)
        if count == 0:
            break
        received += count
    return received


def tune(sock: socket.socket) -> None:
    """Large buffers (before connect or listen, so the window scale can use them) and no Nagle
    delay for the small headers."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def shut(sock: socket.socket) -> None:
    """Wakes any thread blocked on `sock` (the kernel ends its send or receive); safe from any
    thread and on a socket already closed. The owner still closes it."""
    # The plain socket's shutdown: SSLSocket.shutdown would drop its TLS state under a thread
    # that may be inside a TLS read. OSError: already closed, or never connected.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 host]:port"; raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)
