"""The receiver's table of transfers: expected (blocks reserved, no push yet) and active (a push
is streaming into the sink). Shared by every transport's receiver.

One lock guards both maps; it is never held while calling a sink, an abort hook or `on_done`.
Whoever removes a transfer from the table (finish, cancel, close) is the only one that may
report it, which makes `on_done` exactly-once and silent after `cancel`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtransfer.base import KVReceiver, KVSink, TransferResult
from kvtransfer.errors import (
    TransferCancelled,
    TransferError,
    TransferFailedPrecondition,
    TransferNotFound,
    TransferUnavailable,
    as_transfer_error,
)
from kvtransfer.layout import ChunkSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expectation:
    transfer_id: str
    num_tokens: int
    sink: KVSink
    on_done: Callable[[TransferResult], None]


class ActiveTransfer:
    """A transfer whose push has begun. Its sink is written only while open; closing waits for
    a write in progress, so once `close_sink` returns the sink is never touched again."""

    def __init__(self, expectation: Expectation, abort: Callable[[], None]) -> None:
        self.expectation = expectation
        self.abort = abort
        self.start_time = time.monotonic()
        self._sink_lock = threading.Lock()
        self._open = True
        # Payload bytes written to the sink so far.
        self.num_bytes = 0

    @property
    def transfer_id(self) -> str:
        return self.expectation.transfer_id

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        """Raises CANCELLED when the sink was closed (cancel or stop), or the sink's error."""
        with self._sink_lock:
            if not self._open:
                raise TransferCancelled(f"transfer {self.transfer_id}: cancelled by the receiver")
            try:
                self.expectation.sink.write(chunk, data)
            except Exception as exc:
                raise as_transfer_error(exc, f"writing chunk {chunk.seq}") from exc
            self.num_bytes += data.nbytes

    def close_sink(self) -> None:
        with self._sink_lock:
            self._open = False

    def result(self, error: TransferError | None, first_token_id: int = -1) -> TransferResult:
        return TransferResult(
            transfer_id=self.transfer_id,
            ok=error is None,
            first_token_id=first_token_id,
            num_bytes=self.num_bytes,
            elapsed_s=time.monotonic() - self.start_time,
            error=None if error is None else error.to_info(),
        )


class TransferTable:
    """Expected and active transfers of one receiver, plus its byte counter. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: dict[str, Expectation] = {}
        self._active: dict[str, ActiveTransfer] = {}
        self._num_bytes_written = 0
        self._closed = False

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._expected) + len(self._active)

    @property
    def num_bytes_written(self) -> int:
        with self._lock:
            return self._num_bytes_written

    def add_bytes_written(self, num_bytes: int) -> None:
        with self._lock:
            self._num_bytes_written += num_bytes

    def expect(self, expectation: Expectation) -> None:
        """Raises ValueError for a duplicate id, num_tokens < 1, or a closed table."""
        if expectation.num_tokens < 1:
            raise ValueError(f"num_tokens: must be >= 1, got {expectation.num_tokens}")
        with self._lock:
            if self._closed:
                raise ValueError("the receiver is stopped")
            tid = expectation.transfer_id
            if tid in self._expected or tid in self._active:
                raise ValueError(f"transfer {tid} is already expected or in progress")
            self._expected[tid] = expectation

    def begin(self, transfer_id: str, abort: Callable[[], None]) -> ActiveTransfer:
        """Moves an expected transfer to active. Raises NOT_FOUND, FAILED_PRECONDITION (already
        in progress) or UNAVAILABLE (stopped); the table is unchanged then."""
        with self._lock:
            if self._closed:
                raise TransferUnavailable("the receiver is stopped")
            if transfer_id in self._active:
                raise TransferFailedPrecondition(f"transfer {transfer_id} is already in progress")
            expectation = self._expected.pop(transfer_id, None)
            if expectation is None:
                raise TransferNotFound(f"transfer {transfer_id} is not expected by this receiver")
            active = ActiveTransfer(expectation, abort)
            self._active[transfer_id] = active
            return active

    def finish(self, active: ActiveTransfer, result: TransferResult) -> bool:
        """Removes `active` and reports `result`; returns False (reporting nothing) when cancel
        or close removed it first."""
        with self._lock:
            if self._active.get(active.transfer_id) is not active:
                return False
            del self._active[active.transfer_id]
        active.close_sink()
        _report(active.expectation, result)
        return True

    def cancel(self, transfer_id: str) -> None:
        with self._lock:
            self._expected.pop(transfer_id, None)
            active = self._active.pop(transfer_id, None)
        if active is not None:
            active.close_sink()
            active.abort()

    def close(self) -> None:
        """Fails every transfer with UNAVAILABLE and refuses new ones."""
        with self._lock:
            self._closed = True
            expected = list(self._expected.values())
            active = list(self._active.values())
            self._expected.clear()
            self._active.clear()
        error = TransferUnavailable("the receiver was stopped")
        for transfer in active:
            transfer.close_sink()
            transfer.abort()
            _report(transfer.expectation, transfer.result(error))
        for expectation in expected:
            result = TransferResult(expectation.transfer_id, False, -1, 0, 0.0, error.to_info())
            _report(expectation, result)


def _report(expectation: Expectation, result: TransferResult) -> None:
    # A failing callback must not take the receiver thread (and other transfers) down with it.
    try:
        expectation.on_done(result)
    except Exception:
        logger.exception("on_done of transfer %s raised", expectation.transfer_id)


class TableReceiver(KVReceiver):
    """The bookkeeping half of a receiver, shared by every transport: `expect`, `cancel` and
    the counters work on the transfer table; subclasses add serving (start/stop/address)."""

    def __init__(self) -> None:
        self._table = TransferTable()

    def expect(
        self,
        transfer_id: str,
        num_tokens: int,
        sink: KVSink,
        on_done: Callable[[TransferResult], None],
    ) -> None:
        self._table.expect(Expectation(transfer_id, num_tokens, sink, on_done))

    def cancel(self, transfer_id: str) -> None:
        self._table.cancel(transfer_id)

    @property
    def num_pending(self) -> int:
        return self._table.num_pending

    @property
    def total_bytes_received(self) -> int:
        return self._table.num_bytes_written
