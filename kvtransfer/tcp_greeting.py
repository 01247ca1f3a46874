"""One side channel connection between accept and the judgement of its hello, advanced without
blocking by the listener's thread each time its socket is ready (TLS handshake first, when
configured). No thread per connection, and a silent peer costs nothing but its socket until
its deadline."""

from __future__ import annotations

import socket
import ssl

from kvtransfer.tcp_frames import HELLO, HelloError, hello_length, parse_hello


class Greeting:
    """Owns the socket until the listener takes it (`sock`) to park or close it."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLContext | None, deadline: float) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = sock
        if tls is not None:
            self.sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self._handshaking = tls is not None
        self._hello = bytearray()
        self._hello_bytes = HELLO.size
        # Monotonic time by which the hello must be complete.
        self.deadline = deadline
        # The TLS handshake waits for the socket to take bytes rather than to have some.
        self.wants_write = False

    def advance(self) -> tuple[str, bytes] | None:
        """Takes what arrived. Returns (transfer id, ticket) once the whole hello is in, None
        while it is not. Raises HelloError, or OSError (ssl.SSLError included: a peer that does
        not speak TLS on a TLS listener) when the connection must be refused."""
        self.wants_write = False
        try:
            if self._handshaking:
                self.sock.do_handshake()  # type: ignore[attr-defined]
                self._handshaking = False
            while True:
                data = self.sock.recv(self._hello_bytes - len(self._hello))
                if not data:
                    raise HelloError("the connection closed inside the hello")
                self._hello += data
                if len(self._hello) == HELLO.size:
                    # The id length is checked before a byte of the id is read.
                    self._hello_bytes = hello_length(self._hello)
                if len(self._hello) == self._hello_bytes:
                    return parse_hello(self._hello)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return None
