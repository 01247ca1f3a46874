"""Interfaces of a KV transfer: what the workers supply (KVSource, KVSink) and what a transport
provides (KVSender on the prefill replica, KVReceiver on the decode replica).

Life of one transfer:
1. decode replica reserves blocks, then `receiver.expect(transfer_id, num_tokens, sink, on_done)`;
2. prefill replica runs the prompt, then `sender.send(address=..., transfer_id=..., ...)` on a
   worker thread; the sender handshakes (once per address), streams header, chunks, commit;
3. the receiver validates every message, writes chunks into `sink`, and on a valid commit calls
   `on_done(TransferResult(ok=True, ...))`; `send` returns `TransferStats` once acknowledged;
4. any failure calls `on_done(ok=False, error=...)` once and makes `send` raise a TransferError;
   `receiver.cancel(transfer_id)` instead silences `on_done` and fails the sender.

kvtransfer owns no KV blocks: the sink/source belong to the workers, which keep their blocks
until `on_done` ran (decode) or `send` returned or raised (prefill).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvtransfer.errors import TransferError
from kvtransfer.layout import ChunkSpec, KVLayout
from pdserve.errors import ErrorInfo

if TYPE_CHECKING:
    from kvtransfer.faults import ChunkFault

__all__ = [
    "KVReceiver",
    "KVSender",
    "KVSink",
    "KVSource",
    "TransferError",
    "TransferResult",
    "TransferStats",
]


class KVSource(Protocol):
    """The prefill side's finished KV of one request (implemented by the prefill worker)."""

    def read(self, chunk: ChunkSpec) -> bytes | memoryview:
        """Returns the chunk's bytes (keys then values, C-contiguous, chunk.num_bytes(layout)).

        Called from the sender's thread, once per chunk, in stream order, only when the chunk is
        about to be sent. May block. An exception fails the transfer (a PdserveError keeps its
        code, anything else becomes INTERNAL).
        """
        ...


class KVSink(Protocol):
    """The decode side's reserved blocks of one request (implemented by the decode worker)."""

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        """Copies `data` (length and checksum already checked) into the reserved blocks.

        Called from a receiver thread, in stream order, never after `receiver.cancel` returned
        or the transfer failed. `data` is only valid during the call. An exception fails the
        transfer.
        """
        ...


@dataclass(frozen=True)
class TransferStats:
    """What a successful `KVSender.send` reports."""

    transfer_id: str
    # KV bytes moved (as the caches hold them), whatever the wire dtype.
    num_bytes: int
    num_chunks: int
    elapsed_s: float
    transport: str
    # Chunk bytes put on the wire (after `kv_transfer.wire_dtype`; equals `num_bytes` for
    # "cache"); None when the sender does not report it. `begin_send`'s plan knows it.
    num_wire_bytes: int | None = None


@dataclass(frozen=True)
class TransferResult:
    """Given once to the receiver's `on_done` callback when a transfer ends."""

    transfer_id: str
    ok: bool
    first_token_id: int
    num_bytes: int
    elapsed_s: float
    # Set exactly when not ok.
    error: ErrorInfo | None = None


# The first sampled token, or a callable that blocks until it is known and returns it (a
# layer-pipelined send starts before the prefill pass has sampled it). Called once, after the
# last chunk, from the sender's thread; an exception fails the transfer.
FirstToken = int | Callable[[], int]


class KVSender(ABC):
    """Sends KV to receivers of one transport. Thread-safe: many sends may run at once."""

    transport: str

    @abstractmethod
    def send(
        self,
        *,
        address: str,
        transfer_id: str,
        layout: KVLayout,
        num_tokens: int,
        source: KVSource,
        first_token_id: FirstToken,
        cancel: threading.Event | None = None,
        timeout_s: float | None = None,
        fault: ChunkFault | None = None,
    ) -> TransferStats:
        """Moves one request's KV to the receiver at `address`.

        Called from a worker thread of the prefill replica; BLOCKS until the receiver
        acknowledged the commit. `source.read` may block until a chunk's layers exist and
        `first_token_id` may be a blocking callable: the send then overlaps the prefill pass
        (layer pipelining). Handshakes first (cached per address and layout) so nothing
        moves when layouts differ, then streams header, chunks (read lazily from `source`),
        commit. `timeout_s` (default: config.timeout_s) bounds the whole call. Setting `cancel`
        stops it promptly. Owns nothing afterwards: the caller may release its KV once this
        returns or raises.

        Raises TransferError: FAILED_PRECONDITION (layout mismatch, naming the field),
        NOT_FOUND (unknown transfer id), DATA_LOSS, DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE,
        INTERNAL (the source raised). Raises ValueError when num_tokens < 1 (a caller bug).
        `fault` injects a wire fault (tests and chaos runs only; see kvtransfer/faults.py).
        """

    @abstractmethod
    def close(self) -> None:
        """Releases channels. Called once at replica shutdown; sends must have ended."""


class KVReceiver(ABC):
    """Receives KV pushed by senders into sinks registered with `expect`. Thread-safe."""

    transport: str

    @property
    @abstractmethod
    def address(self) -> str:
        """Where senders reach this receiver; valid after `start` (grpc: "host:port")."""

    @abstractmethod
    def start(self) -> None:
        """Starts serving. Called once by the decode replica at start-up; does not block."""

    @abstractmethod
    def stop(self) -> None:
        """Stops serving: in-progress pushes fail, and every transfer not cancelled gets
        `on_done(ok=False, UNAVAILABLE)`. Blocks until the serving threads are done."""

    @abstractmethod
    def expect(
        self,
        transfer_id: str,
        num_tokens: int,
        sink: KVSink,
        on_done: Callable[[TransferResult], None],
    ) -> None:
        """Registers a transfer the receiver will accept.

        Called by the decode replica when it reserves blocks for `transfer_id` (before prefill
        runs); does not block. The receiver holds `sink` until the transfer ends. `on_done` is
        called exactly once from a receiver thread when it completes or fails, unless
        `cancel(transfer_id)` ran first, after which it is never called. Raises ValueError
        when the id is already expected or in progress, or num_tokens < 1.
        """

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Forgets `transfer_id`; an in-progress push for it fails (the sender gets CANCELLED).

        Idempotent; unknown ids are ignored. When it returns the sink is never written again
        and `on_done` is never called, so the caller may free the blocks at once.
        """

    @property
    @abstractmethod
    def num_pending(self) -> int:
        """Transfers expected or in progress (a leak check expects 0 when quiet)."""

    @property
    @abstractmethod
    def total_bytes_received(self) -> int:
        """Lifetime payload bytes written to sinks, including those of pushes that later
        failed or were cancelled."""
