"""The prefill replica's end of the TCP side channel: where each receiver's listener is, and
opening a transfer's connection (TLS when the KV port uses TLS) and presenting its ticket. The
connection then streams the chunk frames once accepted (tcp_connection.py).

Runs on the sender's calling thread. Nothing falls back to in-band bytes: a connection that
cannot be opened fails the transfer.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

from kvtransfer.errors import (
    TransferDeadlineExceeded,
    TransferFailedPrecondition,
    TransferUnavailable,
)
from kvtransfer.tcp_connection import SideChannelConnection
from kvtransfer.tcp_frames import encode_hello, split_address, tune

logger = logging.getLogger(__name__)


def client_tls_context(ca_file: str) -> ssl.SSLContext:
    """TLS towards a receiver's listener, verified against the KV CA (and its host name)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def open_side_channel(
    address: str,
    transfer_id: str,
    ticket: bytes,
    tls: ssl.SSLContext | None,
    deadline: float,
) -> SideChannelConnection:
    """Connects to the listener at `address` and presents `ticket`; the connection's writer
    waits for the acceptance before the first frame, so the push may start at once. BLOCKS
    for the connect (and TLS handshake), at most until `deadline` (monotonic). Raises
    UNAVAILABLE (unreachable), DEADLINE_EXCEEDED, FAILED_PRECONDITION (a malformed address or
    ticket)."""
    try:
        host, port = split_address(address)
        hello = encode_hello(transfer_id, ticket)
    except ValueError as exc:
        raise TransferFailedPrecondition(f"side channel to {address}: {exc}") from exc
    sock: socket.socket | None = None
    try:
        sock = _connect(host, port, deadline)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        sock.sendall(hello)
        # The data phase blocks without a timeout; `close` (and the push's deadline) end it.
        sock.settimeout(None)
        return SideChannelConnection(sock, address, transfer_id)
    except OSError as exc:
        _discard(sock)
        if time.monotonic() >= deadline:
            raise TransferDeadlineExceeded(
                f"opening the side channel to {address}: deadline passed"
            ) from exc
        raise TransferUnavailable(f"cannot open the side channel to {address}: {exc}") from exc


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A connected socket with large buffers, set before connecting so the window scale
    negotiated at the handshake can use them. Raises OSError (socket.timeout included)."""
    family, kind, proto, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        tune(sock)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def _discard(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


class SideChannels:
    """A GrpcSender's side channels: the listener address each receiver told at handshake, the
    TLS context, and counters. Thread-safe (sends run concurrently)."""

    def __init__(self, tls_ca_file: str | None) -> None:
        self._tls = client_tls_context(tls_ca_file) if tls_ca_file else None
        self._lock = threading.Lock()
        self._addresses: dict[str, str] = {}
        self._num_opened = 0

    @property
    def num_opened(self) -> int:
        """Side channel connections opened (one per transfer)."""
        with self._lock:
            return self._num_opened

    def learn(self, address: str, side_address: str) -> None:
        """Records the side channel address the receiver at `address` gave at handshake."""
        with self._lock:
            self._addresses[address] = side_address

    def open(
        self, address: str, transfer_id: str, ticket: bytes, deadline: float
    ) -> SideChannelConnection:
        """Opens the side channel of one transfer to the receiver at `address` (see
        `open_side_channel`); FAILED_PRECONDITION when that receiver has none."""
        with self._lock:
            side_address = self._addresses.get(address, "")
        if not side_address:
            raise TransferFailedPrecondition(
                f"the receiver at {address} has no tcp side channel, which this sender's "
                "kv_transfer.side_channel requires"
            )
        connection = open_side_channel(side_address, transfer_id, ticket, self._tls, deadline)
        with self._lock:
            self._num_opened += 1
            first = self._num_opened == 1
        # Which path the bytes took is observable: once per sender at INFO, then at DEBUG.
        logger.log(logging.INFO if first else logging.DEBUG,
                   "KV transfer %s: chunk bytes over the tcp side channel %s (tls: %s)",
                   transfer_id, side_address, "on" if self._tls is not None else "off")
        return connection
