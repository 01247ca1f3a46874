"""Clients that stop reading: a raw HTTP/2 gRPC call that grants the server a small flow-control
window and never more, and an HTTP/1.1 request on a socket with a tiny receive buffer that is
never read. Both block the server's writes the way a stuck or hostile client does (a grpc-python
client that stops iterating still accepts a few MiB: its window grows with the BDP estimate)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import h2.config
import h2.connection
import h2.events
import h2.settings


class StalledGrpcCall:
    """One unary-stream gRPC call whose client accepts at most `window` bytes of the response.

    A thread reads the connection (acknowledging settings and pings, so the connection stays
    healthy) without ever granting more window; `close()` (or leaving `with`) drops it."""

    def __init__(
        self,
        port: int,
        method: str,
        request: bytes,
        window: int = 16,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self._conn.initiate_connection()
        stream_id = self._conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
            ("te", "trailers"), *metadata,
        ]
        self._conn.send_headers(stream_id, headers)
        framed = b"\x00" + struct.pack(">I", len(request)) + request
        self._conn.send_data(stream_id, framed, end_stream=True)
        self._sock.sendall(self._conn.data_to_send())
        self._sock.settimeout(None)
        # Response bytes received (at most `window`), and whether the server ended the stream.
        self.num_bytes_received = 0
        self.ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for event in self._conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.num_bytes_received += event.flow_controlled_length
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    self.ended = True
            try:
                self._sock.sendall(self._conn.data_to_send())
            except OSError:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the server may have closed it already
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=10)

    def __enter__(self) -> StalledGrpcCall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unread_http_request(port: int, path: str, body: bytes) -> socket.socket:
    """Sends one HTTP/1.1 POST of a JSON `body` from a socket whose receive buffer is as small
    as the kernel allows, and returns the socket unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    sock.connect(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode("ascii") + body)
    return sock
