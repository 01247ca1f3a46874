"""The in-process transport, for tests and warm-up: same stream, same ReceiveSession, no gRPC.

Receivers register in a process-local registry under "inproc://<n>" (the one piece of
module state here: it plays the role of the network). Each push runs on its own receiver
thread fed through a small bounded pipe, so sinks and `on_done` run on a receiver thread as
with gRPC, and a slow sink slows the sender down.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator

from kvtransfer.base import (
    FirstToken,
    KVSender,
    KVSource,
    TransferStats,
)
from kvtransfer.errors import (
    TransferCancelled,
    TransferDeadlineExceeded,
    TransferError,
    TransferFailedPrecondition,
    TransferUnavailable,
)
from kvtransfer.faults import ChunkFault
from kvtransfer.inproc_pipe import Pipe, PushCall
from kvtransfer.layout import KVLayout
from kvtransfer.receive_session import ReceiveSession
from kvtransfer.stream import (
    Chunk,
    Header,
    Message,
    begin_send,
    check_acknowledged,
    outgoing_messages,
)
from kvtransfer.transfer_table import TableReceiver
from pdserve.config import KVTransferConfig

# How often a waiting sender looks at its cancel event and deadline.
_POLL_S = 0.02
# Bound on waiting for one receiver thread at stop.
_STOP_JOIN_S = 5.0


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._receivers: dict[str, InprocReceiver] = {}

    def register(self, receiver: InprocReceiver) -> str:
        with self._lock:
            address = f"inproc://{next(self._ids)}"
            self._receivers[address] = receiver
            return address

    def unregister(self, address: str) -> None:
        with self._lock:
            self._receivers.pop(address, None)

    def lookup(self, address: str) -> InprocReceiver:
        with self._lock:
            receiver = self._receivers.get(address)
        if receiver is None:
            raise TransferUnavailable(f"no in-process KV receiver at {address}")
        return receiver


_REGISTRY = _Registry()


class InprocReceiver(TableReceiver):
    transport = "inproc"

    def __init__(self, layout: KVLayout, config: KVTransferConfig) -> None:
        self.layout = layout
        super().__init__()
        self._address = ""
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    @property
    def address(self) -> str:
        return self._address

    def start(self) -> None:
        if self._address:
            raise RuntimeError("the KV receiver is already started")
        self._address = _REGISTRY.register(self)

    def stop(self) -> None:
        _REGISTRY.unregister(self._address)
        self._table.close()
        with self._threads_lock:
            threads = list(self._threads)
        # Closing the table closed every active pipe, so these threads are finishing.
        for thread in threads:
            thread.join(_STOP_JOIN_S)


    def accept(self, pipe: Pipe) -> PushCall:
        """Starts a receiver thread for one push. Called by InprocSender."""
        call = PushCall()
        thread = threading.Thread(target=self._serve, args=(pipe, call), daemon=True,
                                  name="kv-inproc-receiver")
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()
        return call

    def _serve(self, pipe: Pipe, call: PushCall) -> None:
        def abort_stream() -> None:
            pipe.close(TransferCancelled("push: cancelled by the receiver"))

        session = ReceiveSession(self._table, self.layout, abort_stream)
        try:
            for message in pipe:
                session.handle(message)
            call.finish(session.end(), None)
        except TransferError as err:
            session.abort(err)
            pipe.close(err)
            call.finish(0, err)
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())


class InprocSender(KVSender):
    """KVSender to InprocReceivers of this process. The handshake is a direct layout check on
    every send (nothing to cache)."""

    transport = "inproc"

    def __init__(self, config: KVTransferConfig) -> None:
        self._config = config

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
        start = time.monotonic()
        deadline, cancel, chunks = begin_send(
            self._config, transfer_id, layout, num_tokens, cancel, timeout_s
        )
        receiver = _REGISTRY.lookup(address)
        mismatch = layout.mismatch(receiver.layout)
        if mismatch is not None:
            raise TransferFailedPrecondition(f"layout mismatch: {mismatch}")
        pipe = Pipe()
        call = receiver.accept(pipe)
        header = Header(transfer_id, layout, num_tokens, len(chunks))
        messages = outgoing_messages(header, chunks, source, first_token_id,
                                     lambda: cancel.is_set() or pipe.error is not None, fault)
        # Reading on a thread of its own keeps cancel and the deadline prompt while the
        # source blocks, as gRPC's request thread does.
        threading.Thread(target=_feed, args=(pipe, messages, cancel), daemon=True,
                         name="kv-inproc-sender").start()
        try:
            num_bytes = _wait(call, cancel, deadline)
            check_acknowledged(layout, num_tokens, num_bytes)
        except TransferError as err:
            pipe.close(err)
            raise
        return TransferStats(transfer_id, num_bytes, len(chunks), time.monotonic() - start,
                             self.transport, num_wire_bytes=chunks.num_wire_bytes)

    def close(self) -> None:
        pass


def _detached(message: Message) -> Message:
    # The source may reuse its buffer once the next chunk is read; the pipe holds copies.
    if isinstance(message, Chunk) and not isinstance(message.data, bytes):
        return dataclasses.replace(message, data=bytes(message.data))
    return message


def _feed(pipe: Pipe, messages: Iterator[Message], cancel: threading.Event) -> None:
    """Moves the stream into the pipe until it ends, `cancel` is set, or either side closes
    the pipe."""
    try:
        for message in messages:
            while not pipe.put(_detached(message), _POLL_S):
                if pipe.error is not None:
                    return
    except TransferError as err:
        # The receiver fails the push with this error, which the sender then reports.
        pipe.close(err)
        return
    if cancel.is_set():
        # Ending the stream now would look truncated: the receiver must see a cancellation.
        pipe.close(TransferCancelled("push: cancelled by the sender"))
    else:
        pipe.end()


def _wait(call: PushCall, cancel: threading.Event, deadline: float) -> int:
    """The receiver's payload bytes; raises its error, or CANCELLED / DEADLINE_EXCEEDED."""
    while not call.done.wait(_POLL_S):
        if cancel.is_set():
            raise TransferCancelled("push: cancelled by the sender")
        if time.monotonic() >= deadline:
            raise TransferDeadlineExceeded("push: the transfer passed its deadline")
    if call.error is not None:
        raise call.error
    return call.num_bytes
