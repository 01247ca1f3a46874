"""The decode replica's TCP side channel listener: accepts connections on the KV host, lets
each present its hello (after TLS, when configured) and parks those whose ticket the
TicketBook accepts, for the push that claims them.

One thread does it all with a selector: accepting, advancing each connection's greeting as
its bytes arrive (tcp_greeting.py), closing greetings past their deadline, and sweeping
expired tickets. At most MAX_GREETINGS connections are greeted at once (more are closed at
once). A refused connection is closed without a word, and nothing is allocated for it.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from pathlib import Path

from kvtransfer.tcp_frames import ACCEPT, HelloError, tune
from kvtransfer.tcp_greeting import Greeting
from kvtransfer.tcp_tickets import TicketBook

logger = logging.getLogger(__name__)

# Connections greeted at once; a flood beyond it is refused rather than queued.
MAX_GREETINGS = 64
# How often the thread sweeps expired tickets and greetings when nothing happens.
_SWEEP_INTERVAL_S = 1.0
_BACKLOG = 128


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS for the listener, with the KV port's certificate and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(Path(cert_file), Path(key_file))
    return context


class SideChannelListener:
    """Listens on `host` (port picked by the OS). `start` and `stop` are called by the
    receiver's owner thread; `stop` blocks until the listener's thread ended."""

    def __init__(
        self,
        host: str,
        tickets: TicketBook,
        tls: ssl.SSLContext | None,
        greeting_timeout_s: float,
    ) -> None:
        self._host = host
        self._tickets = tickets
        self._tls = tls
        self._greeting_timeout_s = greeting_timeout_s
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._greetings: dict[socket.socket, Greeting] = {}
        self.address = ""
        # Counters, written by the listener's thread only.
        self.num_accepted = 0
        self.num_refused = 0

    def start(self) -> None:
        """Binds and starts accepting. Raises RuntimeError when the host cannot be bound."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted connections inherit the buffers, set before the window scale is agreed.
            tune(listener)
            listener.bind((self._host, 0))
            listener.listen(_BACKLOG)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise RuntimeError(f"cannot bind the KV side channel to {self._host}: {exc}") from exc
        self._listener = listener
        port = int(listener.getsockname()[1])
        bracketed = f"[{self._host}]" if ":" in self._host else self._host
        self.address = f"{bracketed}:{port}"
        self._thread = threading.Thread(target=self._serve, args=(listener,),
                                        name="kv-side-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self, listener: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set():
                    for key, _ in selector.select(self._next_timeout()):
                        if key.fileobj is listener:
                            self._accept(listener, selector)
                        elif isinstance(key.data, Greeting):
                            self._advance(key.data, selector)
                    self._expire(selector)
                    self._tickets.sweep()
            finally:
                for greeting in list(self._greetings.values()):
                    self._drop(greeting, selector)
                    greeting.sock.close()

    def _next_timeout(self) -> float:
        if not self._greetings:
            return _SWEEP_INTERVAL_S
        earliest = min(greeting.deadline for greeting in self._greetings.values())
        return max(0.0, min(_SWEEP_INTERVAL_S, earliest - time.monotonic()))

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            logger.exception("accepting a KV side channel connection")
            return
        if len(self._greetings) >= MAX_GREETINGS:
            self._refuse(connection, "too many connections being greeted")
            return
        try:
            greeting = Greeting(connection, self._tls, time.monotonic() + self._greeting_timeout_s)
        except OSError as exc:
            self._refuse(connection, f"{type(exc).__name__}: {exc}")
            return
        self._greetings[greeting.sock] = greeting
        selector.register(greeting.sock, selectors.EVENT_READ, greeting)
        # The hello may be in already: no need to wait for the next select.
        self._advance(greeting, selector)

    def _advance(self, greeting: Greeting, selector: selectors.BaseSelector) -> None:
        try:
            hello = greeting.advance()
        except (OSError, HelloError) as exc:
            self._drop(greeting, selector)
            self._refuse(greeting.sock, f"{type(exc).__name__}: {exc}")
            return
        if hello is None:
            events = selectors.EVENT_WRITE if greeting.wants_write else selectors.EVENT_READ
            selector.modify(greeting.sock, events, greeting)
            return
        self._drop(greeting, selector)
        self._admit(greeting.sock, *hello)

    def _admit(self, sock: socket.socket, transfer_id: str, ticket: bytes) -> None:
        if not self._tickets.admissible(transfer_id, ticket):
            self._refuse(sock, f"unknown, used or expired ticket for transfer {transfer_id[:64]}")
            return
        try:
            # The data phase blocks without a timeout: the push wakes it by shutting the socket.
            sock.setblocking(True)
            # Answered before the connection is parked: once parked, the push's reader owns it
            # (a TLS connection must not be written and read by two threads at once). Four
            # bytes to a socket that has sent only its hello: never blocks.
            sock.sendall(ACCEPT)
        except OSError as exc:
            self._refuse(sock, f"{type(exc).__name__}: {exc}")
            return
        if not self._tickets.redeem(transfer_id, ticket, sock):
            # Replaced or expired in between: the sender's push finds no connection.
            self._refuse(sock, f"the ticket of transfer {transfer_id[:64]} lapsed")
            return
        self.num_accepted += 1

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for greeting in [g for g in self._greetings.values() if g.deadline <= now]:
            self._drop(greeting, selector)
            self._refuse(greeting.sock, "no complete hello in time")

    def _drop(self, greeting: Greeting, selector: selectors.BaseSelector) -> None:
        self._greetings.pop(greeting.sock, None)
        selector.unregister(greeting.sock)

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.num_refused += 1
        logger.warning("refused a KV side channel connection: %s", why)
        sock.close()
