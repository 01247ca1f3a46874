"""The benchmark's control channel to its peer process: msgpack maps over a multiprocessing
pipe (`send_bytes`/`recv_bytes`, never pickle), one reply per request.

A request is `{"op": name, ...plain fields}`; a reply is a map, or `{"error": text}` when the
peer could not do it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

import msgpack

# Control messages are a few fields: anything bigger is a bug.
MAX_CONTROL_BYTES = 64 * 1024
# How long a request may take before the peer is deemed stuck (a 4 GiB verify is the longest).
DEFAULT_REPLY_TIMEOUT_S = 300.0


class PeerError(RuntimeError):
    """The peer answered a request with an error, died, or did not answer in time."""


def send_message(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(msgpack.packb(message, use_bin_type=True))


def recv_message(conn: Connection) -> dict[str, Any]:
    """Blocks for the next message; raises PeerError when it is not a map."""
    raw = conn.recv_bytes(MAX_CONTROL_BYTES)
    message = msgpack.unpackb(raw, raw=False)
    if not isinstance(message, dict):
        raise PeerError(f"control message is a {type(message).__name__}, not a map")
    return message


class PeerProcess:
    """The peer: a child started with the 'spawn' method running `target(conn)`.

    Owned by the benchmark's main thread: `request` blocks until the reply and is not
    thread-safe. `close` asks the peer to exit and joins it (killing it if it hangs).
    """

    def __init__(self, target: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=target, args=(child_conn,), daemon=True)
        self._process.start()
        child_conn.close()

    def request(
        self, op: str, timeout_s: float = DEFAULT_REPLY_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        """Sends one request and waits for its reply; raises PeerError on an error reply, a
        dead peer or no reply within `timeout_s`."""
        try:
            send_message(self._conn, {"op": op, **fields})
            if not self._conn.poll(timeout_s):
                raise PeerError(f"{op}: no reply within {timeout_s} s")
            reply = recv_message(self._conn)
        except (EOFError, OSError) as exc:
            raise PeerError(f"{op}: the peer process is gone ({exc})") from exc
        if "error" in reply:
            raise PeerError(f"{op}: {reply['error']}")
        return reply

    def close(self) -> None:
        # A peer that is already gone needs no goodbye.
        with contextlib.suppress(PeerError):
            self.request("exit", timeout_s=30.0)
        self._process.join(timeout=30.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
