"""Whether a request's client reads its stream, told to the replica its sequence runs on.

The request's `ClientStream` owns one `ReaderPace` and sets it: stalled once a write has waited
`timeouts.reader_slow_s` for the client, not stalled when that write completes. Every attempt
of the request (one per choice, a new one after a preemption or a migration) follows it with
`tell`: the replica holding the attempt's sequence hears the current value when the sequence
is placed there and every change after it (`mark_reader`, fire and forget, like `abort`), and
serves a stalled reader's sequence last: it is the first preemption victim there, so its KV
goes to clients that read (`decode_worker.kv_growth`).

Event loop only.
"""

from __future__ import annotations

from collections.abc import Callable

from router.replica_pool import DEAD, Replica

Listener = Callable[[bool], None]


class ReaderPace:
    """One request's reader state; the `ClientStream` is its only writer."""

    def __init__(self) -> None:
        self.stalled = False
        self._listeners: list[Listener] = []

    def set_stalled(self, stalled: bool) -> None:
        """Records the client's state; tells the followers when it changed."""
        if stalled == self.stalled:
            return
        self.stalled = stalled
        for listener in list(self._listeners):
            listener(stalled)

    def tell(self, replica: Replica, transfer_id: str) -> Callable[[], None]:
        """Keeps `replica` told whether the reader of `transfer_id` is stalled: now when it
        is, then on every change. Returns the function that stops it (call it when the
        attempt ends)."""

        def send(stalled: bool) -> None:
            if replica.state != DEAD:
                replica.handle.mark_reader.remote(transfer_id, stalled)

        if self.stalled:
            send(True)
        return self.watch(send)

    def watch(self, listener: Listener) -> Callable[[], None]:
        """Calls `listener` with the new state on every change; returns the function that
        stops it."""
        self._listeners.append(listener)
        return lambda: self._forget(listener)

    def _forget(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
