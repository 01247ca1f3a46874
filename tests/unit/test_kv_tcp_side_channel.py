"""The grpc transport's TCP side channel end to end: bytes arrive bit for bit (with and without
TLS), injected faults and a dropped connection fail both sides with typed errors, cancels wake
blocked reads and sends, nothing falls back to in-band bytes, and nothing leaks."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtransfer import (
    ChunkSpec,
    KVLayout,
    TransferError,
    make_receiver,
    make_sender,
    plan_chunks,
)
from kvtransfer.faults import ChunkFault
from kvtransfer.grpc_receiver import GrpcReceiver
from kvtransfer.grpc_sender import GrpcSender
from kvtransfer.tcp_connection import SideChannelConnection
from pdserve.config import KVTransferConfig
from pdserve.errors import StatusCode
from tests.factories.tls import write_pem_pair
from tests.unit.test_kv_grpc_transport import (
    CONFIG,
    INBAND_CONFIG,
    LAYOUT,
    NUM_TOKENS,
    WAIT_S,
    ArraySink,
    ArraySource,
    DoneRecorder,
    assert_good_transfer,
    send,
)

SIDE_THREAD_PREFIX = "kv-side-"


def side_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(SIDE_THREAD_PREFIX)]


def num_open_sockets() -> int:
    """Sockets this process holds (gRPC may add pollers and event fds of its own lazily)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(link.startswith("socket:") for link in links)


def make_pair(config: KVTransferConfig = CONFIG,
              layout: KVLayout = LAYOUT) -> tuple[GrpcReceiver, GrpcSender]:
    receiver = make_receiver("grpc", layout, config)
    receiver.start()
    sender = make_sender("grpc", config)
    assert isinstance(receiver, GrpcReceiver) and isinstance(sender, GrpcSender)
    return receiver, sender


@pytest.fixture
def pair() -> Iterator[tuple[GrpcReceiver, GrpcSender]]:
    receiver, sender = make_pair()
    yield receiver, sender
    sender.close()
    receiver.stop()


def capture_connections(sender: GrpcSender) -> list[SideChannelConnection]:
    """Records each side channel connection the sender opens (to break one on purpose)."""
    opened: list[SideChannelConnection] = []
    side = sender._side
    assert side is not None
    original = side.open

    def open_and_record(*args: object) -> SideChannelConnection:
        connection = original(*args)  # type: ignore[arg-type]
        opened.append(connection)
        return connection

    side.open = open_and_record  # type: ignore[method-assign]
    return opened


def test_round_trip_is_bit_identical_and_visible(pair: tuple[GrpcReceiver, GrpcSender]) -> None:
    receiver, sender = pair
    assert receiver.side_channel_address.startswith("127.0.0.1:")
    opened = capture_connections(sender)
    assert_good_transfer(sender, receiver, "t1")
    assert sender.transport == "grpc" and sender.side_channel == "tcp"
    assert sender.num_side_channel_transfers == 1 and len(opened) == 1
    assert opened[0].num_bytes_sent == LAYOUT.kv_bytes(NUM_TOKENS)
    assert receiver.total_bytes_received == LAYOUT.kv_bytes(NUM_TOKENS)
    assert receiver._side is not None and receiver._side.tickets.num_entries == 0


def test_round_trip_over_tls(tmp_path: Path) -> None:
    cert, key = write_pem_pair(tmp_path, "kv")
    config = KVTransferConfig(**{**CONFIG.model_dump(), "tls_cert_file": str(cert),
                                 "tls_key_file": str(key), "tls_ca_file": str(cert)})
    receiver, sender = make_pair(config)
    try:
        opened = capture_connections(sender)
        assert_good_transfer(sender, receiver, "t1")
        # Never plaintext KV bytes when TLS is configured.
        assert len(opened) == 1 and isinstance(opened[0]._sock, ssl.SSLSocket)
        plain = socket.create_connection(_host_port(receiver.side_channel_address))
        with plain:
            plain.sendall(b"PDKV" + bytes(36))
            assert closed_without_answer(plain)  # not TLS: refused
        assert_good_transfer(sender, receiver, "t2")
    finally:
        sender.close()
        receiver.stop()


def test_frames_carry_the_wire_dtype() -> None:
    """Frames are sized by the header's wire dtype (bfloat16 halves a float32 cache's bytes)."""
    config = KVTransferConfig(**{**CONFIG.model_dump(), "wire_dtype": "bfloat16"})
    receiver, sender = make_pair(config)
    try:
        opened = capture_connections(sender)
        source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
            DoneRecorder()
        receiver.expect("t1", NUM_TOKENS, sink, done)
        send(sender, receiver, "t1", source)
        assert done.wait().ok
        assert opened[0].num_bytes_sent == LAYOUT.kv_bytes(NUM_TOKENS) // 2
        np.testing.assert_allclose(sink.keys, source.keys, rtol=1e-2, atol=1e-2)
    finally:
        sender.close()
        receiver.stop()


def test_side_channel_none_keeps_the_in_band_path() -> None:
    receiver, sender = make_pair(INBAND_CONFIG)
    try:
        assert receiver.side_channel_address == "" and sender.side_channel == "none"
        assert_good_transfer(sender, receiver, "t1")
        assert sender.num_side_channel_transfers == 0
    finally:
        sender.close()
        receiver.stop()


def test_no_silent_fallback_to_in_band_bytes() -> None:
    """A tcp sender facing a receiver without a side channel fails loudly, before any byte."""
    receiver = make_receiver("grpc", LAYOUT, INBAND_CONFIG)
    receiver.start()
    sender = make_sender("grpc", CONFIG)
    try:
        source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
            DoneRecorder()
        receiver.expect("t1", NUM_TOKENS, sink, done)
        with pytest.raises(TransferError, match="no tcp side channel") as caught:
            send(sender, receiver, "t1", source)
        assert caught.value.code is StatusCode.FAILED_PRECONDITION
        assert source.num_reads == 0 and sink.num_writes == 0 and done.results == []
        receiver.cancel("t1")
    finally:
        sender.close()
        receiver.stop()


# Sink writes before the fault at chunk 2 is caught: a duplicate is caught after its original.
WRITES_BEFORE_FAULT = {"corrupt": 2, "drop": 2, "duplicate": 3}


@pytest.mark.parametrize("kind", sorted(WRITES_BEFORE_FAULT))
def test_injected_fault_is_data_loss_on_both_sides(
    pair: tuple[GrpcReceiver, GrpcSender], kind: str
) -> None:
    receiver, sender = pair
    sink, done = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    with pytest.raises(TransferError) as caught:
        send(sender, receiver, "t1", ArraySource(LAYOUT, NUM_TOKENS),
             fault=ChunkFault(kind, seq=2))
    assert caught.value.code is StatusCode.DATA_LOSS
    result = done.wait()
    assert result.error is not None and result.error.code is StatusCode.DATA_LOSS
    # Only the chunks before the damaged one reached the sink.
    assert sink.num_writes == WRITES_BEFORE_FAULT[kind] and receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def test_delayed_chunk_still_arrives(pair: tuple[GrpcReceiver, GrpcSender]) -> None:
    receiver, sender = pair
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    send(sender, receiver, "t1", source, fault=ChunkFault("delay", seq=1, delay_s=0.05))
    assert done.wait().ok
    np.testing.assert_array_equal(sink.values, source.values)


def test_dropped_connection_fails_both_sides(pair: tuple[GrpcReceiver, GrpcSender]) -> None:
    receiver, sender = pair
    opened = capture_connections(sender)
    sink, done = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()

    first_three = sum(spec.num_bytes(LAYOUT) for spec in
                      plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes)[:3])

    class DroppingSource(ArraySource):
        def read(self, chunk: ChunkSpec) -> memoryview:
            if chunk.seq == 3:
                # The network drops the side channel once three chunks went out.
                assert _wait_for(lambda: opened[0].num_bytes_sent == first_three)
                socket.socket.shutdown(opened[0]._sock, socket.SHUT_RDWR)
            return super().read(chunk)

    receiver.expect("t1", NUM_TOKENS, sink, done)
    with pytest.raises(TransferError) as caught:
        send(sender, receiver, "t1", DroppingSource(LAYOUT, NUM_TOKENS))
    assert caught.value.code is StatusCode.DATA_LOSS
    result = done.wait()
    assert result.error is not None and result.error.code is StatusCode.DATA_LOSS
    assert "side channel" in result.error.message
    assert sink.num_writes == 3 and receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def test_refused_connection_fails_the_transfer_loudly(
    pair: tuple[GrpcReceiver, GrpcSender], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, sender = pair
    assert receiver._side is not None
    refused_before = receiver._side.listener.num_refused
    monkeypatch.setattr(receiver._side.tickets, "admissible", lambda *_: False)
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    with pytest.raises(TransferError, match="refused the ticket") as caught:
        send(sender, receiver, "t1", source)
    assert caught.value.code is StatusCode.UNAVAILABLE
    result = done.wait()
    assert result.error is not None and result.error.code is StatusCode.CANCELLED
    assert sink.num_writes == 0 and receiver.num_pending == 0
    assert receiver._side.listener.num_refused == refused_before + 1
    monkeypatch.undo()
    assert_good_transfer(sender, receiver, "t2")


def test_nothing_leaks_after_failures_and_stop() -> None:
    warm_receiver, warm_sender = make_pair()
    assert_good_transfer(warm_sender, warm_receiver, "warm")
    warm_sender.close()
    warm_receiver.stop()
    baseline_sockets = num_open_sockets()
    assert side_threads() == []
    receiver, sender = make_pair()
    for index, kind in enumerate(["corrupt", "drop", "duplicate"]):
        receiver.expect(f"f{index}", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
        with pytest.raises(TransferError):
            send(sender, receiver, f"f{index}", ArraySource(LAYOUT, NUM_TOKENS),
                 fault=ChunkFault(kind, seq=1))
    assert_good_transfer(sender, receiver, "ok")
    assert receiver._side is not None and receiver._side.tickets.num_entries == 0
    sender.close()
    receiver.stop()
    assert side_threads() == []
    assert num_open_sockets() <= baseline_sockets


def _wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Polls a condition another thread will make true (bounded by `timeout_s`)."""
    event = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        event.wait(0.01)
    return condition()


def closed_without_answer(sock: socket.socket) -> bool:
    """True when the peer closed the connection without sending a byte."""
    sock.settimeout(WAIT_S)
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
