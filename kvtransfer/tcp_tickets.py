"""One-time tickets that admit TCP side channel connections, and the connections they admitted
until a push claims them.

Life of a ticket: `mint` (OpenSideChannel, an authenticated gRPC call) -> `redeem` (the
listener, when a connection presents it: the connection is parked) -> `claim` (the push whose
header names the transfer takes the connection, waiting briefly if the sender's hello is still
on its way). A ticket admits one connection, for its transfer id only, before it expires; a
parked connection nobody claims is closed when it expires.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtransfer.errors import TransferResourceExhausted, TransferUnavailable
from kvtransfer.tcp_frames import TICKET_BYTES

# Tickets (and parked connections) kept at once; a decode replica rarely has more transfers
# in flight than a few per prefill peer.
MAX_TICKETS = 1024
# How often a claim waiting for its connection looks at its stop condition.
_CLAIM_POLL_S = 0.05


@dataclass
class _Entry:
    ticket: bytes
    expires_at: float
    connection: socket.socket | None = None


class TicketBook:
    """Tickets and parked connections by transfer id. Thread-safe: gRPC threads mint and claim,
    the listener's threads redeem and sweep. Owns the parked connections (closes them when
    they expire, are replaced, or the book is closed)."""

    def __init__(self, ttl_s: float, max_tickets: int = MAX_TICKETS) -> None:
        self.ttl_s = ttl_s
        self._max_tickets = max_tickets
        self._lock = threading.Lock()
        # Notified when a connection is parked (a claim may be waiting for it).
        self._redeemed = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._closed = False

    @property
    def num_entries(self) -> int:
        """Tickets not yet claimed (redeemed or not); a leak check expects 0 when quiet."""
        with self._lock:
            return len(self._entries)

    def mint(self, transfer_id: str) -> bytes:
        """A fresh ticket for `transfer_id`, replacing an earlier one (and closing the
        connection it admitted). Raises RESOURCE_EXHAUSTED when MAX_TICKETS are outstanding,
        UNAVAILABLE once closed."""
        self.sweep()
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            if self._closed:
                raise TransferUnavailable("the receiver is stopped")
            old = self._entries.pop(transfer_id, None)
            full = len(self._entries) >= self._max_tickets
            if not full:
                self._entries[transfer_id] = _Entry(ticket, time.monotonic() + self.ttl_s)
        _close_parked(old)
        if full:
            raise TransferResourceExhausted(f"{self._max_tickets} side channel tickets are "
                                            "outstanding")
        return ticket

    def admissible(self, transfer_id: str, ticket: bytes) -> bool:
        """Whether `ticket` is that transfer's, unexpired and unused (compared in constant
        time); changes nothing."""
        with self._lock:
            return self._valid_locked(transfer_id, ticket, time.monotonic()) is not None

    def redeem(self, transfer_id: str, ticket: bytes, connection: socket.socket) -> bool:
        """Parks `connection` for `transfer_id` when the ticket is `admissible`; False
        otherwise (the caller then closes it)."""
        with self._lock:
            entry = self._valid_locked(transfer_id, ticket, time.monotonic())
            if entry is None:
                return False
            entry.connection = connection
            self._redeemed.notify_all()
            return True

    def _valid_locked(self, transfer_id: str, ticket: bytes, now: float) -> _Entry | None:
        entry = self._entries.get(transfer_id)
        if entry is None or not hmac.compare_digest(entry.ticket, ticket):
            return None
        if entry.connection is not None or entry.expires_at <= now:
            return None
        return entry

    def claim(
        self, transfer_id: str, wait_s: float = 0.0, stop: Callable[[], bool] = lambda: False
    ) -> socket.socket | None:
        """The connection parked for `transfer_id` (the caller owns it from now on), or None
        when none was admitted or it expired. A ticket not yet presented is waited for up to
        `wait_s` (the sender presents it while it starts the push), checking `stop` on the
        way. Removes the ticket either way: a connection presenting it later would have no
        push to serve."""
        give_up = time.monotonic() + wait_s
        with self._lock:
            while True:
                entry = self._entries.get(transfer_id)
                remaining = give_up - time.monotonic()
                if entry is None or entry.connection is not None or remaining <= 0 or stop():
                    break
                # Bounded slices: `stop` is a poll (a cancelled push does not notify).
                self._redeemed.wait(min(remaining, _CLAIM_POLL_S))
            self._entries.pop(transfer_id, None)
        if entry is None or entry.connection is None:
            return None
        if entry.expires_at <= time.monotonic():
            _close_parked(entry)
            return None
        return entry.connection

    def sweep(self) -> None:
        """Drops expired tickets and closes the connections they parked."""
        now = time.monotonic()
        with self._lock:
            expired = [tid for tid, entry in self._entries.items() if entry.expires_at <= now]
            dropped = [self._entries.pop(tid) for tid in expired]
        for entry in dropped:
            _close_parked(entry)

    def close(self) -> None:
        """Drops every ticket, closes every parked connection, and refuses new tickets."""
        with self._lock:
            self._closed = True
            dropped = list(self._entries.values())
            self._entries.clear()
        for entry in dropped:
            _close_parked(entry)


def _close_parked(entry: _Entry | None) -> None:
    if entry is not None and entry.connection is not None:
        entry.connection.close()
