"""Cancels on the TCP side channel: a cancel wakes a send blocked on a connection the receiver
no longer drains, and a receiver cancel while a chunk's bytes are due fails the sender and
closes its connection."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from kvtransfer import ChunkSpec, KVLayout, TransferError
from kvtransfer.grpc_receiver import GrpcReceiver
from kvtransfer.grpc_sender import GrpcSender
from kvtransfer.tcp_connection import SideChannelConnection
from pdserve.config import KVTransferConfig
from pdserve.errors import StatusCode
from tests.unit.test_kv_grpc_transport import (
    LAYOUT,
    NUM_TOKENS,
    WAIT_S,
    ArraySink,
    ArraySource,
    DoneRecorder,
    assert_good_transfer,
    send,
)
from tests.unit.test_kv_tcp_side_channel import _wait_for, capture_connections, make_pair


@pytest.fixture
def pair() -> Iterator[tuple[GrpcReceiver, GrpcSender]]:
    receiver, sender = make_pair()
    yield receiver, sender
    sender.close()
    receiver.stop()


class GatedSink(ArraySink):
    """A sink whose first write blocks until released: the receiver stops reading."""

    def __init__(self, layout: KVLayout, num_tokens: int) -> None:
        super().__init__(layout, num_tokens)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        self.entered.set()
        # Longer than any wait of the test: only the test releases it.
        self.release.wait(3 * WAIT_S)
        super().write(chunk, data)


# Large enough that the sender's sends block once the receiver stops reading: far more than
# the two sockets' buffers (8 MiB each at most here).
BIG_LAYOUT = KVLayout("fp-big", num_layers=16, num_kv_heads=4, head_dim=128, dtype="float32")
BIG_TOKENS = 1024
BIG_CONFIG = KVTransferConfig(chunk_bytes=4 * 1024 * 1024, timeout_s=10.0)


def run_in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_cancel_wakes_a_send_blocked_on_the_side_channel() -> None:
    receiver, sender = make_pair(BIG_CONFIG, BIG_LAYOUT)
    try:
        opened = capture_connections(sender)
        sink, done = GatedSink(BIG_LAYOUT, BIG_TOKENS), DoneRecorder()
        source = ArraySource(BIG_LAYOUT, BIG_TOKENS)
        receiver.expect("t1", BIG_TOKENS, sink, done)
        cancel = threading.Event()
        thread, errors = run_in_thread(lambda: sender.send(
            address=receiver.address, transfer_id="t1", layout=BIG_LAYOUT,
            num_tokens=BIG_TOKENS, source=source, first_token_id=1, cancel=cancel))
        assert sink.entered.wait(WAIT_S)
        assert _wait_for(lambda: bool(opened))
        assert_send_stalls(opened[0])
        cancel.set()
        thread.join(WAIT_S)
        assert not thread.is_alive()
        [error] = errors
        assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
        # The blocked send was woken (the receiver still reads nothing) and closed the socket.
        assert _wait_for(lambda: opened[0]._sock.fileno() == -1)
        sink.release.set()
        assert not done.wait().ok and receiver.num_pending == 0
    finally:
        sender.close()
        receiver.stop()


def assert_send_stalls(connection: SideChannelConnection) -> None:
    """Waits until a send is in progress and makes no progress (its bytes fill both sockets'
    buffers): observed in 25 consecutive looks 10 ms apart, within WAIT_S."""
    event = threading.Event()
    last, num_same = -1, 0
    for _ in range(int(WAIT_S / 0.01)):
        sent = connection.num_bytes_sent if connection._sending else -1
        num_same = num_same + 1 if sent >= 0 and sent == last else 0
        if num_same >= 25:
            return
        last = sent
        event.wait(0.01)
    raise AssertionError("the sender never stalled")


def test_receiver_cancel_while_chunk_bytes_are_due_fails_the_sender(
    pair: tuple[GrpcReceiver, GrpcSender],
) -> None:
    receiver, sender = pair
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    opened = capture_connections(sender)
    stalled = threading.Event()
    release = threading.Event()
    original_send = SideChannelConnection._send

    def stalling_send(connection: SideChannelConnection, chunk: object) -> bool:
        if chunk.spec.seq == 2:  # type: ignore[attr-defined]
            # The bytes do not come (until the connection is closed): the receiver waits.
            stalled.set()
            while not release.is_set() and not connection._stopped:
                release.wait(0.01)
        return original_send(connection, chunk)  # type: ignore[arg-type]

    receiver.expect("t1", NUM_TOKENS, sink, done)
    SideChannelConnection._send = stalling_send  # type: ignore[method-assign]
    try:
        thread, errors = run_in_thread(lambda: send(sender, receiver, "t1", source))
        assert stalled.wait(WAIT_S) and _wait_for(lambda: sink.num_writes == 2)
        receiver.cancel("t1")
        thread.join(WAIT_S)
        assert not thread.is_alive()
    finally:
        release.set()
        SideChannelConnection._send = original_send  # type: ignore[method-assign]
    [error] = errors
    assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
    assert sink.num_writes == 2 and done.results == [] and receiver.num_pending == 0
    assert opened[0]._sock.fileno() == -1
    assert_good_transfer(sender, receiver, "t2")
